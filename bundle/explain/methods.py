"""One interface to every explanation method: SoftCAM's own evidence and the post-hoc baselines.

    explainer = make_explainer("gradcam", model)          # or EXPLAINERS["gradcam"](model)
    explanation = explainer(images, targets)              # images (B, Ch, H, W[, D]), targets (B,) or None
    explanation.raw        # (B, 1, h, w[, d]) float32, the method's own resolution, not normalised
    explanation.upsampled  # (B, 1, H, W[, D]) float32, raw resized to the input (bi/trilinear)

Each image gets the map of its own target class (``targets=None``: the classifier head's arg-max),
unlike MONAI's GradCAM, which explains one class for the whole batch.

| name | library | raw map | sign |
| --- | --- | --- | --- |
| ``softcam`` | (the model) | SoftCAM evidence map of the same forward pass, bias included: its mean is the logit | signed |
| ``cam`` | torchcam ``CAM`` | sum_d w_kd F_d (Zhou et al.): head weight row k on the features, no bias, no ReLU | signed |
| ``gradcam`` | torchcam ``GradCAM`` | ReLU(sum_d mean(dY_k/dF_d) F_d) | >= 0 |
| ``gradcampp`` | torchcam ``GradCAMpp``, paper's weights (``_PaperGradCAMpp``) | ReLU(sum_d w_d F_d), Grad-CAM++ weights | >= 0 |
| ``xgradcam`` | torchcam ``XGradCAM`` | ReLU(sum_d w_d F_d), XGrad-CAM weights | >= 0 |
| ``layercam`` | torchcam ``LayerCAM`` | ReLU(sum_d ReLU(dY_k/dF_d) * F_d) | >= 0 |
| ``scorecam`` | torchcam ``ScoreCAM`` | ReLU(sum_d softmax_d(score gain of masking by F_d) F_d) | >= 0 |
| ``integrated_gradients`` | captum | attributions at input resolution, summed over input channels | signed |
| ``guided_backprop`` | captum | guided gradients at input resolution, summed over input channels | signed |

F is the backbone's last feature map (the output of ``model.features``), Y_k the logit explained.
Summing over input channels keeps Integrated Gradients' completeness (the map sums to
logit(x) - logit(baseline)). Guided Backprop overrides only ``nn.ReLU`` modules (MONAI's ResNets
use them; DenseNet's final functional ReLU and EfficientNet's swish are plain gradients).

**Dual-branch sigmoid head** (Oh & Noh, BMVC 2025): with ``branch=True`` on a
``SigmoidBranchClassifier`` the CAM family takes its channel weights from the sigmoid branch's raw
logit z_k* (CAM: the branch's weight row; gradient methods: gradients of z_k*), clamps them to >= 0
and returns M = ReLU(sum_d max(w_d, 0) F_d); Score-CAM scores masked inputs by z_k* with no clamp;
``softcam`` returns the branch's signed evidence maps (its spatial mean is z_k). The class k* is
still the original softmax head's arg-max unless ``targets`` are given.

Every explainer runs the model in eval mode with gradients on, even inside ``torch.no_grad()`` or
on tensors made under ``torch.inference_mode()`` (it works on a clone), and afterwards restores
each module's train/eval flag and a SoftCAM head's kept ``evidence_maps``; parameters'
``requires_grad`` are left alone, and no hook outlives a call (torchcam extractors are context
managers, captum removes its own).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from captum.attr import GuidedBackprop, IntegratedGradients
from torch import nn
from torchcam.methods import CAM, GradCAM, GradCAMpp, LayerCAM, ScoreCAM, XGradCAM
from torchcam.methods.core import _CAM

from bundle.networks.classifier import ClassEvidenceHead, ImageClassifier, LinearHead
from bundle.networks.sigmoid_branch import SigmoidBranchClassifier
from bundle.visualize import upsample


@dataclass(frozen=True)
class Explanation:
    """Maps of one class per image, detached, float32, on the model's device.

    raw: (B, 1, h, w[, d]) at the method's resolution (feature map for SoftCAM and the CAM family,
        input for Integrated Gradients / Guided Backprop); not normalised, signed where the method is.
    upsampled: (B, 1, H, W[, D]) raw resized to the input (``bundle.visualize.upsample``: bilinear /
        trilinear, align_corners False); raw itself when it is already at input resolution.
    targets: (B,) the class each map explains.
    """

    raw: torch.Tensor
    upsampled: torch.Tensor
    targets: torch.Tensor


@contextmanager
def _explanation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode with gradients enabled (also under no_grad / inference_mode); restores every module's
    training flag and the evidence maps SoftCAM heads keep from the caller's last forward pass."""
    training = [(module, module.training) for module in model.modules()]
    kept_maps = [(head, head.evidence_maps) for head in model.modules() if isinstance(head, ClassEvidenceHead)]
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for module, was_training in training:
            module.training = was_training
        for head, maps in kept_maps:
            head.evidence_maps = maps


class Explainer(ABC):
    """Turns (images, one target class per image) into an ``Explanation``; subclasses give the raw map."""

    supports_branch: ClassVar[bool] = False

    def __init__(self, model: ImageClassifier, branch: bool = False):
        if branch and not self.supports_branch:
            raise ValueError(f"{type(self).__name__} has no sigmoid-branch variant")
        if branch and not isinstance(model, SigmoidBranchClassifier):
            raise TypeError(f"branch=True needs a SigmoidBranchClassifier, got a {type(model).__name__}")
        self.model = model
        self.branch = branch

    def __call__(self, images: torch.Tensor, targets: torch.Tensor | Sequence[int] | None = None) -> Explanation:
        """images (B, Ch, H, W[, D]); targets (B,) class indices, or None for the head's arg-max."""
        device = next(self.model.parameters()).device
        with _explanation_mode(self.model):
            # a plain tensor (not a MetaTensor), and a normal one even if made under inference_mode
            x = images.as_subclass(torch.Tensor).detach().to(device).clone()
            if targets is None:
                with torch.no_grad():
                    targets = self.model(x).argmax(dim=1)
            targets = torch.as_tensor(targets, device=device).reshape(-1).long()
            if len(targets) != len(x):
                raise ValueError(f"{len(targets)} targets for {len(x)} images: give one class per image")
            if (targets < 0).any():  # a negative index would silently pick a class from the end
                raise ValueError(f"class indices must be >= 0, got {targets.tolist()}")
            raw = self.raw_maps(x, targets).detach().float()
        upsampled = raw if raw.shape[2:] == x.shape[2:] else upsample(raw, tuple(x.shape[2:]))
        return Explanation(raw=raw, upsampled=upsampled, targets=targets)

    @abstractmethod
    def raw_maps(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, 1, *spatial) maps of ``targets`` for ``images`` already on the model's device."""


def _select(maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Map of each image's own class: (B, C, *spatial) -> (B, 1, *spatial)."""
    return maps[torch.arange(len(maps), device=maps.device), targets].unsqueeze(1)


class SoftCAMExplainer(Explainer):
    """SoftCAM's class evidence maps from the forward pass itself: no backward pass, no perturbation."""

    supports_branch = True

    def __init__(self, model: ImageClassifier, branch: bool = False):
        super().__init__(model, branch)
        if not isinstance(model.head, ClassEvidenceHead):
            raise TypeError(f"softcam explains SoftCAM classifiers; this one has a {type(model.head).__name__}")

    def raw_maps(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            forward = self.model.forward_with_branch_maps if self.branch else self.model.forward_with_maps
            _, maps = forward(images)
        return _select(maps, targets)


class _BranchLogits(nn.Module):
    """A ``SigmoidBranchClassifier`` seen as a model whose output is its branch's logits."""

    def __init__(self, model: SigmoidBranchClassifier):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, branch=True)


class _NonNegativeWeights:
    """Mixin for a torchcam extractor: Oh & Noh's rule M = ReLU(sum_d max(w_d, 0) F_d)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._relu = True

    def _get_weights(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        return [weight.clamp_min(0) for weight in super()._get_weights(*args, **kwargs)]


@functools.cache
def _with_non_negative_weights(method: type[_CAM]) -> type[_CAM]:
    return type(f"NonNegative{method.__name__}", (_NonNegativeWeights, method), {})


class _PaperGradCAMpp(GradCAMpp):
    """Grad-CAM++ with the paper's weights (Chattopadhay et al. 2018, eq. 19):
    alpha_ij = g_ij^2 / (2 g_ij^2 + g_ij^3 sum_ab F_ab), w = sum_ij alpha_ij ReLU(g_ij).
    Hand-written because torchcam 0.5.0 divides a masked copy in place (its alpha stays g^2) and
    sums F_ab g_ab^3 instead of g_ij^3 sum_ab F_ab. Computed as w = sum_ij ReLU(g_ij) / (2 + g_ij sum F)
    over g_ij > 0, the same value without g^2, g^3 under-flowing or an eps that swamps small gradients."""

    def _get_weights(self, class_idx: int | list[int], scores: torch.Tensor, **kwargs: Any) -> list[torch.Tensor]:
        self._backprop(scores, class_idx, **kwargs)
        weights = []
        for grad, activation in zip(self.hook_g, self.hook_a, strict=True):
            summed = activation.flatten(2).sum(-1)[(...,) + (None,) * (activation.ndim - 2)]
            positive = grad > 0
            weighted = torch.where(positive, grad / (2 + grad * summed).where(positive, 1.0), 0.0)
            weights.append(weighted.flatten(2).sum(-1))
        return weights


def _class_weight_layer(head: nn.Module) -> nn.Module:
    """The layer holding the head's (C, D) class weights: ``fc`` of a linear head, the 1x1 evidence conv of SoftCAM."""
    if isinstance(head, LinearHead):
        return head.fc
    if isinstance(head, ClassEvidenceHead):
        return head.class_evidence_layer
    raise TypeError(f"no class weight layer known for a {type(head).__name__}")


class TorchCAMExplainer(Explainer):
    """A torchcam extractor on the backbone's last feature map (``model.features``).

    Subclasses name the torchcam method and whether it needs gradients. ``options`` go to the
    extractor's constructor (e.g. ``batch_size`` for Score-CAM).
    """

    supports_branch = True
    method: ClassVar[type[_CAM]]
    uses_gradients: ClassVar[bool] = True
    clamps_branch_weights: ClassVar[bool] = True

    def __init__(self, model: ImageClassifier, branch: bool = False, **options: Any):
        super().__init__(model, branch)
        self.options = options

    def extractor_options(self) -> dict[str, Any]:
        return dict(self.options)

    def raw_maps(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        scorer = _BranchLogits(self.model) if self.branch else self.model
        method = _with_non_negative_weights(self.method) if self.branch and self.clamps_branch_weights else self.method
        with method(scorer, target_layer=self.model.features, **self.extractor_options()) as extractor:
            with torch.set_grad_enabled(self.uses_gradients):
                # the input carries the graph, so gradients reach the features even when every parameter is frozen
                scores = scorer(images.requires_grad_(self.uses_gradients))
            maps = extractor(class_idx=targets.tolist(), scores=scores, normalized=False)[0]
        return maps.unsqueeze(1)


class CAMExplainer(TorchCAMExplainer):
    """Class activation map (Zhou et al. 2016): the head's (or branch's) weight row of the class on the features."""

    method = CAM
    uses_gradients = False

    def extractor_options(self) -> dict[str, Any]:
        head = self.model.branch if self.branch else self.model.head
        return {**self.options, "fc_layer": _class_weight_layer(head)}


class GradCAMExplainer(TorchCAMExplainer):
    """Grad-CAM (Selvaraju et al. 2017): channel weights = spatial mean of the logit's gradients."""

    method = GradCAM


class GradCAMppExplainer(TorchCAMExplainer):
    """Grad-CAM++ (Chattopadhay et al. 2018), with the paper's alpha (see ``_PaperGradCAMpp``)."""

    method = _PaperGradCAMpp


class XGradCAMExplainer(TorchCAMExplainer):
    """XGrad-CAM (Fu et al. 2020): gradients weighted by the normalised activations."""

    method = XGradCAM


class LayerCAMExplainer(TorchCAMExplainer):
    """LayerCAM (Jiang et al. 2021): per-location weights ReLU(gradient)."""

    method = LayerCAM


class ScoreCAMExplainer(TorchCAMExplainer):
    """Score-CAM (Wang et al. 2020): channel weights from the logit gain of the input masked by each
    feature map. B * D extra forward passes, ``batch_size`` (default 32) at a time."""

    method = ScoreCAM
    uses_gradients = False
    clamps_branch_weights = False  # softmax weights are positive already; Oh & Noh use no clamp here


class IntegratedGradientsExplainer(Explainer):
    """Integrated Gradients (Sundararajan et al. 2017, captum) from a constant ``baseline`` image
    (0: black after windowing to [0, 1]) in ``n_steps``; raw = attributions summed over input channels."""

    def __init__(self, model: ImageClassifier, branch: bool = False, n_steps: int = 32, baseline: float = 0.0,
                 internal_batch_size: int | None = None):
        super().__init__(model, branch)
        self.n_steps = n_steps
        self.baseline = baseline
        self.internal_batch_size = internal_batch_size

    def raw_maps(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        attributions = IntegratedGradients(self.model).attribute(
            images, baselines=self.baseline, target=targets, n_steps=self.n_steps, internal_batch_size=self.internal_batch_size
        )
        return attributions.sum(dim=1, keepdim=True)


class GuidedBackpropExplainer(Explainer):
    """Guided Backpropagation (Springenberg et al. 2015, captum): input gradients with negative
    gradients stopped at every ``nn.ReLU``; raw = summed over input channels."""

    def raw_maps(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        images.requires_grad_()  # captum would set it too, with a warning on every call
        return GuidedBackprop(self.model).attribute(images, target=targets).sum(dim=1, keepdim=True)


EXPLAINERS: dict[str, type[Explainer]] = {
    "softcam": SoftCAMExplainer,
    "cam": CAMExplainer,
    "gradcam": GradCAMExplainer,
    "gradcampp": GradCAMppExplainer,
    "xgradcam": XGradCAMExplainer,
    "layercam": LayerCAMExplainer,
    "scorecam": ScoreCAMExplainer,
    "integrated_gradients": IntegratedGradientsExplainer,
    "guided_backprop": GuidedBackpropExplainer,
}


def make_explainer(name: str, model: ImageClassifier, **options: Any) -> Explainer:
    """The explainer ``name`` (a key of ``EXPLAINERS``) for ``model``; ``branch=True`` for the
    sigmoid-branch variant of softcam and the CAM family, other options go to the method."""
    if name not in EXPLAINERS:
        raise ValueError(f"unknown explanation method {name!r}; choose one of {sorted(EXPLAINERS)}")
    return EXPLAINERS[name](model, **options)
