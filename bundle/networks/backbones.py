"""MONAI CNN backbones cut before their global pooling, so any classification head can sit on top.

Each supported family keeps the original MONAI network as the ``net`` submodule (so checkpoints
saved from a plain MONAI network load by their own key names) and only says how to run it up to
its last feature map.

``output_stride`` (input size / feature map size) trades the last stages' strides for dilation,
as DeepLab does (Chen et al. 2017, "Rethinking atrous convolution"): the map gets finer while the
receptive field and the parameters stay the same. MONAI's ResNets downsample 16-fold at their
default stem (``conv1_t_stride=1``, then the max pool and three stride-2 stages; 32-fold with
``conv1_t_stride=2``); ``output_stride=8`` turns a 128 x 128 input's 8 x 8 map into 16 x 16.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from monai.networks import nets
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneFamily:
    """How to build one MONAI network family and run it up to its last feature map."""

    build: Callable[..., nn.Module]  # (spatial_dims, in_channels, **constructor options) -> MONAI network
    features: type[FeatureExtractor]  # runs the network up to its last feature map
    head_modules: tuple[str, ...]  # attributes of the MONAI network that form its pooling + head
    # (net, stages): replace the strides of the last ``stages`` stages by dilation; None: not offered
    dilate: Callable[[nn.Module, int], None] | None = None
    dilatable_stages: int = 0


class FeatureExtractor(nn.Module):
    """A MONAI network run up to its last feature map (B, D, h, w[, d]), in code TorchScript compiles.

    One subclass per family. ``BackboneFeatures.forward`` runs the family's ``forward`` on its own
    ``net``; when the classifier is scripted (``ckpt_export``), ``BackboneFeatures`` hands TorchScript
    an extractor holding that same ``net`` (``__prepare_scriptable__``), so the scripted module's
    parameters keep their names (``features.net.*``).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net


class _ResNetFeatures(FeatureExtractor):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.act(self.net.bn1(self.net.conv1(x)))
        if not self.net.no_max_pool:
            x = self.net.maxpool(x)
        return self.net.layer4(self.net.layer3(self.net.layer2(self.net.layer1(x))))


class _DenseNetFeatures(FeatureExtractor):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # DenseNet's final ReLU lives in its class_layers; keep it with the features.
        return F.relu(self.net.features(x))


class _SENetFeatures(FeatureExtractor):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


class _EfficientNetFeatures(FeatureExtractor):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net._swish(self.net._bn0(self.net._conv_stem(self.net._conv_stem_padding(x))))
        x = self.net._blocks(x)
        return self.net._swish(self.net._bn1(self.net._conv_head(self.net._conv_head_padding(x))))


def _atrous(conv: nn.Module, dilation: int) -> None:
    """Make a (strided) convolution run at stride 1 with ``dilation``, padding so the size is kept."""
    dims = len(conv.kernel_size)
    conv.stride = (1,) * dims
    conv.dilation = (dilation,) * dims
    conv.padding = tuple(dilation * (k // 2) for k in conv.kernel_size)


def _dilate_resnet(net: nn.Module, stages: int) -> None:
    """Replace the stride of ResNet's last ``stages`` stages (layer4, then layer3, layer2) by dilation.

    The semantics of torchvision's ``replace_stride_with_dilation`` (DeepLab's atrous algorithm):
    in a dilated stage the strided 3x3 convolution runs at stride 1 with the dilation in force
    before the stage, and every later 3x3 convolution (the rest of its block, the stage's other
    blocks, the later stages) gets the stage's dilation, doubled per dilated stage. torchvision
    refuses this for basic blocks; the rule extends to them unchanged (their second 3x3
    convolution comes after the stride). The 1x1 shortcut drops its stride. No parameter changes,
    so weights load across output strides, and in eval mode the dilated network's map sampled
    every 2**stages cells equals the native map (the convolutions read the same inputs).
    MONAI builds its ResNets without a dilation option, hence this in-place change (the same one
    segmentation_models_pytorch makes to its encoders).
    """
    dilation = 1
    for layer in (net.layer2, net.layer3, net.layer4)[3 - stages:]:
        before, dilation = dilation, dilation * 2
        for index, block in enumerate(layer):
            convs = [(name, m) for name, m in block.named_modules()
                     if isinstance(m, nn.modules.conv._ConvNd) and not name.startswith("downsample")]
            for _, conv in convs:
                if max(conv.kernel_size) == 1:
                    continue
                _atrous(conv, before if index == 0 and max(conv.stride) > 1 else dilation)
            if index == 0:
                block.stride = 1
                shortcut = block.downsample
                if isinstance(shortcut, nn.Sequential):  # shortcut "B": 1x1 convolution + norm
                    shortcut[0].stride = (1,) * len(shortcut[0].stride)
                elif isinstance(shortcut, partial):  # shortcut "A": strided pooling + zero channels
                    block.downsample = partial(shortcut.func, *shortcut.args, **{**shortcut.keywords, "stride": 1})


def _resnet(depth: int) -> BackboneFamily:
    factory = getattr(nets, f"resnet{depth}")
    return BackboneFamily(
        build=lambda dims, ch, **kw: factory(spatial_dims=dims, n_input_channels=ch, num_classes=2, **kw),
        features=_ResNetFeatures,
        head_modules=("avgpool", "fc"),
        dilate=_dilate_resnet,
        dilatable_stages=3,
    )


BACKBONES: dict[str, BackboneFamily] = {
    **{f"resnet{d}": _resnet(d) for d in (10, 18, 34, 50, 101, 152)},
    "densenet121": BackboneFamily(
        build=lambda dims, ch, **kw: nets.DenseNet121(spatial_dims=dims, in_channels=ch, out_channels=2, **kw),
        features=_DenseNetFeatures,
        head_modules=("class_layers",),
    ),
    "seresnet50": BackboneFamily(
        build=lambda dims, ch, **kw: nets.SEResNet50(spatial_dims=dims, in_channels=ch, num_classes=2, **kw),
        features=_SENetFeatures,
        head_modules=("adaptive_avg_pool", "dropout", "last_linear"),
    ),
    "efficientnet-b0": BackboneFamily(
        build=lambda dims, ch, **kw: nets.EfficientNetBN(
            "efficientnet-b0", pretrained=False, spatial_dims=dims, in_channels=ch, num_classes=2, **kw
        ),
        features=_EfficientNetFeatures,
        head_modules=("_avg_pooling", "_dropout", "_fc"),
    ),
}


class BackboneFeatures(nn.Module):
    """A MONAI CNN without its global pooling and linear head.

    Input (B, in_channels, H, W[, D]); output the last feature map (B, num_features, h, w[, d]),
    h = ceil(H / output_stride) and so on. ``options`` go to the MONAI constructor
    (``widen_factor=0.25`` for a slim ResNet, say). ``output_stride``: None or the network's own
    stride keeps the network as MONAI builds it; half or a quarter of it (an eighth: ResNets
    only) dilates the last stages instead of striding (``_dilate_resnet``); other families raise.
    """

    def __init__(self, name: str, spatial_dims: int = 2, in_channels: int = 1, output_stride: int | None = None,
                 **options):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.name = name
        self.spatial_dims = spatial_dims
        self._family = BACKBONES[name]
        self.net = self._family.build(spatial_dims, in_channels, **options)
        heads = self._family.head_modules
        # keys a full MONAI checkpoint of this network has for the head we drop
        self.head_keys = frozenset(k for k in self.net.state_dict() if k.split(".")[0] in heads)
        for attr in heads:
            if getattr(self.net, attr, None) is not None:
                setattr(self.net, attr, nn.Identity())  # unused parameters would upset DDP
        self.num_features, strides = self._probe(in_channels)
        self.native_stride = strides[0] if len(set(strides)) == 1 else strides
        self.output_stride = self._set_output_stride(output_stride)

    _PROBE = 64

    def _probe(self, in_channels: int) -> tuple[int, tuple[int, ...]]:
        """Feature channels and the stride along each axis, from a forward pass of a 64-voxel cube."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            out = self.forward(torch.zeros((1, in_channels) + (self._PROBE,) * self.spatial_dims))
        self.train(was_training)
        return int(out.shape[1]), tuple(self._PROBE // s for s in out.shape[2:])

    def _set_output_stride(self, output_stride: int | None) -> int | tuple[int, ...]:
        native = self.native_stride
        if output_stride is None or output_stride == native:
            return native
        family = self._family
        if family.dilate is None:
            raise ValueError(f"output_stride {output_stride} is not available for {self.name}, whose output stride is "
                             f"{native}: only the ResNet backbones can trade stride for dilation")
        if not isinstance(native, int):
            raise ValueError(f"output_stride needs the same stride on every axis; this {self.name} has {native}")
        offered = [native >> k for k in range(family.dilatable_stages + 1)]
        if output_stride not in offered:
            raise ValueError(f"output_stride {output_stride} is not available for {self.name} with these options; "
                             f"choose one of {offered}")
        family.dilate(self.net, offered.index(output_stride))
        return output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._family.features.forward(self, x)  # the family's code, on this module's ``net``

    def __prepare_scriptable__(self) -> FeatureExtractor:
        """What ``torch.jit.script`` compiles in place of this module: the family's extractor over the same
        ``net`` (this module's other attributes, a family record and key sets, are Python-only). As for any
        ``__prepare_scriptable__``, torch puts it into the module tree it was given: script a copy to keep one."""
        return self._family.features(self.net)

    def load_weights(self, path: str | Path) -> None:
        """Load backbone weights from a local checkpoint: of the same MONAI network, a torchvision
        ResNet or a MedicalNet 3D ResNet (``bundle.networks.pretrained`` says how each maps; a
        ``torchvision:``/``medicalnet:``/``monai:`` prefix names the format, else the key names
        tell). The checkpoint's head is ignored; any other missing, unexpected or mis-shaped key is
        an error naming the file.
        """
        from bundle.networks.pretrained import backbone_state, split_format

        state, fmt = backbone_state(self, path)
        self.net.load_state_dict(state)
        logger.info("loaded %d backbone tensors from %s (%s checkpoint)", len(state), split_format(path)[1].name, fmt)
