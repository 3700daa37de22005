"""Image classifiers = backbone features + a replaceable head.

- ``ClassEvidenceHead`` (SoftCAM, Djoumessi & Berens, MIDL 2026): a 1x1(x1) convolution from the
  D feature channels to C signed class evidence maps; the logits are their spatial mean, so the
  explanation is the prediction itself.
- ``LinearHead``: the black-box baseline, global average pooling + linear layer.
- ``class_evidence``: which of a SoftCAM head's maps is the explanation, raw E_k or the contrast map.
"""

from __future__ import annotations

import torch
from monai.networks.layers import Conv
from torch import nn

from bundle.networks.backbones import BackboneFeatures

EVIDENCE_MAPS = ("raw", "contrast")


def class_evidence(maps: torch.Tensor, kind: str = "raw") -> torch.Tensor:
    """The explanation of every class from class evidence maps (B, C, h, w[, d]) (or logits (B, C)).

    ``"raw"``: E_k itself. ``"contrast"``: E_k minus the mean of the other classes' maps,
    (C E_k - sum_j E_j) / (C - 1); for two classes E_1 - E_0 and E_0 - E_1. Softmax fixes only the
    differences of logits, so a map added to every class's evidence leaves the prediction as it is
    and is pinned down only by the regulariser; the contrast map is the part the prediction fixes.
    Its spatial mean is the contrast of the logits, so it is the logit of k against the rest.
    Same shape and dtype as ``maps``; needs C >= 2.
    """
    if kind == "raw":
        return maps
    if kind != "contrast":
        raise ValueError(f"evidence map kind must be one of {EVIDENCE_MAPS}, got {kind!r}")
    classes = maps.shape[1]
    if classes < 2:
        raise ValueError(f"a contrast map needs at least two classes, got maps of shape {tuple(maps.shape)}")
    return (classes * maps - maps.sum(dim=1, keepdim=True)) / (classes - 1)


class ClassEvidenceHead(nn.Module):
    """SoftCAM class evidence layer.

    Input features (B, D, h, w[, d]); returns logits (B, C) and keeps the evidence maps of that
    same forward pass in ``evidence_maps`` (B, C, h, w[, d], signed, unbounded).
    """

    def __init__(self, num_features: int, num_classes: int, spatial_dims: int):
        super().__init__()
        self.class_evidence_layer = Conv[Conv.CONV, spatial_dims](num_features, num_classes, kernel_size=1, bias=True)
        self.evidence_maps: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.forward_with_maps(features)[0]

    def forward_with_maps(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, C) and the evidence maps (B, C, h, w[, d]) they are the spatial mean of."""
        maps = self.class_evidence_layer(features)
        if not torch.jit.is_scripting():  # kept for the loss and the explainers; a scripted model returns them
            self.evidence_maps = maps
        return maps.flatten(2).mean(dim=2), maps

    def class_maps(self, features: torch.Tensor) -> torch.Tensor:
        """Class evidence maps (B, C, h, w[, d]) of ``features``: the maps the logits are the mean of."""
        return self.class_evidence_layer(features)


class LinearHead(nn.Module):
    """Global average pooling + linear layer (the black-box baseline). Returns logits (B, C)."""

    def __init__(self, num_features: int, num_classes: int, spatial_dims: int):
        super().__init__()
        self.fc = nn.Linear(num_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.flatten(2).mean(dim=2))

    def forward_with_maps(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, C) and their class activation maps (B, C, h, w[, d]) (``class_maps``)."""
        return self.forward(features), self.class_maps(features)

    def class_maps(self, features: torch.Tensor) -> torch.Tensor:
        """Class activation maps (Zhou et al. 2016) (B, C, h, w[, d]): the linear layer applied at
        every location. Exact for this head: their spatial mean equals the logits."""
        bias = self.fc.bias.reshape([1, -1] + [1] * (features.dim() - 2))
        return torch.einsum("cd,bd...->bc...", self.fc.weight, features) + bias


HEADS = {"softcam": ClassEvidenceHead, "linear": LinearHead}


class ImageClassifier(nn.Module):
    """Backbone features followed by a classification head; ``forward`` returns logits (B, C).

    Scriptable (``torch.jit.script``, as ``monai.bundle ckpt_export`` does): the scripted module keeps
    ``forward`` and ``forward_with_maps``. ``build_options``: the keyword arguments of ``classifier``
    it was built with (see there), which ``bundle.checkpoints`` saves beside the weights.
    """

    # Python-only (a scripted model returns its maps): not compiled, and not read while scripting. TorchScript
    # honours the second list only for properties a class defines itself: subclasses define it again.
    __jit_unused_properties__ = __jit_ignored_attributes__ = ["evidence_maps"]

    def __init__(self, features: BackboneFeatures, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head
        self.build_options: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.jit.export
    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, C) and the class maps (B, C, h, w[, d]) they are the spatial mean of, in one pass."""
        return self.head.forward_with_maps(self.features(x))

    @property
    def evidence_maps(self) -> torch.Tensor:
        """Class evidence maps (B, C, h, w[, d]) of the last forward pass (SoftCAM heads only)."""
        if not isinstance(self.head, ClassEvidenceHead):
            raise TypeError(f"a {type(self.head).__name__} produces no class evidence maps")
        if self.head.evidence_maps is None:
            raise RuntimeError("no forward pass has run yet")
        return self.head.evidence_maps


def classifier(
    backbone: str = "resnet18",
    spatial_dims: int = 2,
    in_channels: int = 1,
    num_classes: int = 2,
    head: str = "softcam",
    backbone_weights: str | None = None,
    backbone_kwargs: dict | None = None,
    output_stride: int | None = None,
) -> ImageClassifier:
    """Build a SoftCAM (``head="softcam"``) or black-box (``head="linear"``) classifier.

    ``backbone_weights``: optional local checkpoint of the same MONAI backbone to start from.
    ``backbone_kwargs``: options for the MONAI backbone's constructor (e.g. ``{"widen_factor": 0.25}``).
    ``output_stride``: input size / evidence map size; None keeps the backbone's own (16 for MONAI's
    ResNets at their default stem), 8 or 4 dilate a ResNet's last stages (``BackboneFeatures``).
    The model keeps these arguments in ``build_options`` (``bundle.checkpoints`` describes a checkpoint
    with them; keep them plain values: strings, numbers, lists, dicts, None).
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {sorted(HEADS)}")
    options = dict(locals())  # every keyword argument, so a new option is described with the others
    features = BackboneFeatures(backbone, spatial_dims=spatial_dims, in_channels=in_channels,
                                output_stride=output_stride, **(backbone_kwargs or {}))
    if backbone_weights:
        features.load_weights(backbone_weights)
    model = ImageClassifier(features, HEADS[head](features.num_features, num_classes, spatial_dims))
    model.build_options = options
    return model
