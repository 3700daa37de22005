"""MONAI CNN backbones cut before their global pooling, so any classification head can sit on top.

Each supported family keeps the original MONAI network as the ``net`` submodule (so checkpoints
saved from a plain MONAI network load by their own key names) and only says how to run it up to
its last feature map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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


def _resnet(depth: int) -> BackboneFamily:
    factory = getattr(nets, f"resnet{depth}")
    return BackboneFamily(
        build=lambda dims, ch, **kw: factory(spatial_dims=dims, n_input_channels=ch, num_classes=2, **kw),
        features=_ResNetFeatures,
        head_modules=("avgpool", "fc"),
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

    Input (B, in_channels, H, W[, D]); output the last feature map (B, num_features, h, w[, d]).
    ``options`` go to the MONAI constructor (``widen_factor=0.25`` for a slim ResNet, say).
    """

    def __init__(self, name: str, spatial_dims: int = 2, in_channels: int = 1, **options):
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
        self.num_features = self._count_features(in_channels)

    def _count_features(self, in_channels: int) -> int:
        was_training = self.training
        self.eval()
        with torch.no_grad():
            probe = torch.zeros((1, in_channels) + (64,) * self.spatial_dims)
            channels = int(self.forward(probe).shape[1])
        self.train(was_training)
        return channels

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
