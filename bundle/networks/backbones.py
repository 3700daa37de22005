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
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (net, x) -> (B, D, h, w[, d])
    head_modules: tuple[str, ...]  # attributes of the MONAI network that form its pooling + head


def _resnet_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.act(net.bn1(net.conv1(x)))
    if not net.no_max_pool:
        x = net.maxpool(x)
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _densenet_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # DenseNet's final ReLU lives in its class_layers; keep it with the features.
    return F.relu(net.features(x))


def _senet_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.features(x)


def _efficientnet_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net._swish(net._bn0(net._conv_stem(net._conv_stem_padding(x))))
    x = net._blocks(x)
    return net._swish(net._bn1(net._conv_head(net._conv_head_padding(x))))


def _resnet(depth: int) -> BackboneFamily:
    factory = getattr(nets, f"resnet{depth}")
    return BackboneFamily(
        build=lambda dims, ch, **kw: factory(spatial_dims=dims, n_input_channels=ch, num_classes=2, **kw),
        features=_resnet_features,
        head_modules=("avgpool", "fc"),
    )


BACKBONES: dict[str, BackboneFamily] = {
    **{f"resnet{d}": _resnet(d) for d in (10, 18, 34, 50, 101, 152)},
    "densenet121": BackboneFamily(
        build=lambda dims, ch, **kw: nets.DenseNet121(spatial_dims=dims, in_channels=ch, out_channels=2, **kw),
        features=_densenet_features,
        head_modules=("class_layers",),
    ),
    "seresnet50": BackboneFamily(
        build=lambda dims, ch, **kw: nets.SEResNet50(spatial_dims=dims, in_channels=ch, num_classes=2, **kw),
        features=_senet_features,
        head_modules=("adaptive_avg_pool", "dropout", "last_linear"),
    ),
    "efficientnet-b0": BackboneFamily(
        build=lambda dims, ch, **kw: nets.EfficientNetBN(
            "efficientnet-b0", pretrained=False, spatial_dims=dims, in_channels=ch, num_classes=2, **kw
        ),
        features=_efficientnet_features,
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
        return self._family.features(self.net, x)

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
