"""Backbone weights from the checkpoints users have, mapped onto the bundle's MONAI networks.

Formats (named by a ``FORMAT:`` prefix of the path, else detected from the key names):

- ``monai``: a checkpoint of the same MONAI network (bare, or under "state_dict"/"model"/"network";
  "module." and "net." prefixes stripped); its head is ignored; every other key must fit.
- ``torchvision``: an ImageNet ResNet-18/34/50/101/152 state dict of torchvision (detected by a 2D
  first convolution with 3 input channels, an ``fc`` head and projection shortcuts without bias). torchvision's
  key names are MONAI's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``/``.1``,
  ``fc``); its stem is a 7x7 stride-2 convolution and a 3x3 stride-2 max pooling, so the backbone
  must be built with ``conv1_t_stride=2`` (MONAI's default stride is 1: a different network
  that the same tensors would fit silently).
- ``medicalnet``: a Tencent MedicalNet (Med3D) 3D ResNet checkpoint ("state_dict", "module."
  prefixes, same block names, a ``conv_seg`` segmentation head, ignored; detected by that head).
  Its stem is torchvision's in 3D; ResNet-10/50/... use projection shortcuts without bias,
  ResNet-18/34 were released with shortcut type A (no shortcut weights), so those need
  ``shortcut_type='A'``. MedicalNet dilates layer3/layer4 (stride 1, dilation 2 and 4) where
  MONAI's ResNet strides them; the tensors have the same shapes, and MONAI's own
  ``resnet*(pretrained=True)`` loads MedicalNet weights into that same strided network.

Mapping for torchvision and MedicalNet, as with timm's ``adapt_input_conv``: a 3-channel first
convolution is summed over its input channels for a 1-channel backbone (a grey image then gives
the response an RGB image of the same grey would). MONAI's downsample convolutions have a bias by
default where these checkpoints have none: it is set to zero, which computes the same. A BatchNorm
``num_batches_tracked`` absent from an old checkpoint starts at 0, as PyTorch itself does for such
files. Every other key must be present, expected and of the right shape, or the load is refused
with the file named.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from monai.networks.nets.resnet import resnet_params
from torch import nn

FORMATS = ("monai", "torchvision", "medicalnet")
# the stem both torchvision and MedicalNet were trained with
PRETRAINED_STEM = {"kernel": 7, "stride": 2, "max_pool": True}
STEM_KWARGS = "--backbone_kwargs \"{'conv1_t_size': 7, 'conv1_t_stride': 2, 'no_max_pool': False}\""


def split_format(spec: str | Path) -> tuple[str | None, Path]:
    """``"torchvision:/w/resnet50.pth"`` -> ("torchvision", path); a plain path -> (None, path)."""
    head, sep, rest = str(spec).partition(":")
    return (head, Path(rest)) if sep and head in FORMATS else (None, Path(spec))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from "state_dict"/"model"/"network", without
    "module." (DataParallel/DDP) and "net." prefixes."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors of every kind for a file that is no checkpoint
        raise ValueError(f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {err})") from None
    for key in ("state_dict", "model", "network"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module.").removeprefix("net."): v for k, v in state.items()}


def detect_format(state: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("conv_seg.") for k in state):
        return "medicalnet"
    conv1 = state.get("conv1.weight")
    downsample = [k for k in state if ".downsample.0." in k]  # torchvision: projection shortcuts, never a bias
    if (conv1 is not None and conv1.ndim == 4 and conv1.shape[1] == 3 and "fc.weight" in state
            and "layer1.0.conv1.weight" in state and downsample and all(k.endswith(".weight") for k in downsample)):
        return "torchvision"
    return "monai"


def resnet_depth(state: dict[str, torch.Tensor]) -> str | None:
    """The MONAI ResNet name (``resnet50``) whose blocks the checkpoint's keys describe, or None."""
    blocks = [len({m.group(1) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))}) for i in range(1, 5)]
    kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    return next((name for name, (block, layers, *_) in resnet_params.items() if (block, layers) == (kind, blocks)), None)


def _describe_stem(net: nn.Module) -> str:
    k, s = net.conv1.kernel_size, net.conv1.stride
    return f"a {'x'.join(map(str, k))} stride-{s[0]} first convolution {'without' if net.no_max_pool else 'with'} max pooling"


def _check_resnet_fits(features, state: dict[str, torch.Tensor], fmt: str, path: Path) -> None:
    """Refuse, naming both, a checkpoint of another dimensionality, depth, stem or shortcut type."""
    net, dims = features.net, features.spatial_dims
    weights_dims = state["conv1.weight"].ndim - 2 if "conv1.weight" in state else None
    if weights_dims != dims:
        raise ValueError(f"{path}: {fmt} weights are {weights_dims}D, the {features.name} backbone is {dims}D")
    depth = resnet_depth(state)
    if depth != features.name:
        raise ValueError(f"{path} holds {fmt} {depth or 'unrecognised ResNet'} weights; the backbone is {features.name}")
    stem = (net.conv1.kernel_size, net.conv1.stride, not net.no_max_pool)
    if stem != ((PRETRAINED_STEM["kernel"],) * dims, (PRETRAINED_STEM["stride"],) * dims, PRETRAINED_STEM["max_pool"]):
        raise ValueError(f"{path}: {fmt} {depth} weights were trained with a 7x7 stride-2 first convolution with max "
                         f"pooling; this backbone has {_describe_stem(net)}: build it with {STEM_KWARGS}")
    has_projection = any(".downsample." in k for k in state)
    wants_projection = any(".downsample." in k for k in net.state_dict())
    if has_projection != wants_projection:
        needed, built = ("B", "A") if has_projection else ("A", "B")
        raise ValueError(f"{path}: {fmt} {depth} weights use shortcut type {needed}; the backbone was built with "
                         f"type {built}: build it with --backbone_kwargs \"{{'shortcut_type': '{needed}'}}\"")


def _map_resnet(features, state: dict[str, torch.Tensor], fmt: str, path: Path) -> dict[str, torch.Tensor]:
    head = "fc." if fmt == "torchvision" else "conv_seg."
    _check_resnet_fits(features, state, fmt, path)
    own = features.net.state_dict()
    mapped = {k: v for k, v in state.items() if not k.startswith(head)}
    conv1, want = mapped["conv1.weight"], own["conv1.weight"].shape[1]
    if conv1.shape[1] == 3 and want == 1:
        mapped["conv1.weight"] = conv1.sum(dim=1, keepdim=True)
    elif conv1.shape[1] != want:
        raise ValueError(f"{path}: {fmt} weights take {conv1.shape[1]} input channels, the backbone {want} (--in_channels)")
    for key, value in own.items():
        if key not in mapped and (key.endswith("downsample.0.bias") or key.endswith("num_batches_tracked")):
            mapped[key] = torch.zeros_like(value)  # no bias: a zero bias; no count: PyTorch's own default
    return mapped


def backbone_state(features, spec: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict for ``features.net`` (a ``BackboneFeatures``) from the checkpoint ``spec``
    (``[FORMAT:]path``), and the format it was read as. Raises ``FileNotFoundError`` or
    ``ValueError`` naming the file when it does not fit."""
    fmt, path = split_format(spec)
    state = read_state_dict(path)
    fmt = fmt or detect_format(state)
    return map_state(features, state, fmt, path), fmt


def map_state(features, state: dict[str, torch.Tensor], fmt: str, path: Path) -> dict[str, torch.Tensor]:
    """``state`` (read from ``path``, in format ``fmt``) as the keys and shapes of ``features.net``."""
    if fmt == "monai":
        state = {k: v for k, v in state.items() if k not in features.head_keys}
    elif not features.name.startswith("resnet"):
        raise ValueError(f"{path}: {fmt} weights are ResNet weights; the backbone is {features.name}")
    else:
        state = _map_resnet(features, state, fmt, path)
    own = features.net.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    mis_shaped = [k for k in state if k in own and state[k].shape != own[k].shape]
    if unexpected or missing or mis_shaped:
        raise ValueError(
            f"{path} ({fmt} checkpoint) does not hold {features.name} ({features.spatial_dims}D) backbone weights: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in mis_shaped[:5]]}"
        )
    return state
