"""One interface to every explanation method: SoftCAM's own evidence and the post-hoc baselines.

    explainer = make_explainer("gradcam", model)          # or EXPLAINERS["gradcam"](model)
    explanation = explainer(images, targets)              # images (B, Ch, H, W[, D]), targets (B,) or None
    explanation.raw        # (B, 1, h, w[, d]) float32, the method's own resolution, not normalised
    explanation.upsampled  # (B, 1, H, W[, D]) float32, raw resized to the input (bi/trilinear)

Each image gets the map of its own class (``targets=None``: the softmax head's arg-max), unlike
MONAI's GradCAM, which explains one class for the whole batch. *What* is explained is a target
(``bundle.explain.targets``): ``make_explainer("gradcam", model, target="branch")`` explains the
sigmoid branch's logit, ``make_explainer("softcam", model, target="contrast")`` SoftCAM's contrast map.

| name | library | raw map | sign |
| --- | --- | --- | --- |
| ``softcam`` | (the model) | SoftCAM class map of the same forward pass, bias included: its mean is the score | signed |
| ``cam`` | torchcam ``CAM`` | sum_d w_kd F_d (Zhou et al.): the class weight row k on the features, no bias, no ReLU | signed |
| ``gradcam`` | torchcam ``GradCAM`` | ReLU(sum_d mean(dY_k/dF_d) F_d) | >= 0 |
| ``gradcampp`` | torchcam ``GradCAMpp``, paper's weights (``_PaperGradCAMpp``) | ReLU(sum_d w_d F_d), Grad-CAM++ weights | >= 0 |
| ``xgradcam`` | torchcam ``XGradCAM`` | ReLU(sum_d w_d F_d), XGrad-CAM weights | >= 0 |
| ``layercam`` | torchcam ``LayerCAM`` | ReLU(sum_d ReLU(dY_k/dF_d) * F_d) | >= 0 |
| ``scorecam`` | torchcam ``ScoreCAM`` | ReLU(sum_d softmax_d(score gain of masking by F_d) F_d) | >= 0 |
| ``integrated_gradients`` | captum | attributions at input resolution, summed over input channels | signed |
| ``guided_backprop`` | captum | guided gradients at input resolution, summed over input channels | signed |

F is the backbone's last feature map (the output of ``model.features``), Y_k the target's score.
Summing over input channels keeps Integrated Gradients' completeness (the map sums to
Y_k(x) - Y_k(baseline)). Guided Backprop overrides only ``nn.ReLU`` modules (MONAI's ResNets
use them; DenseNet's final functional ReLU and EfficientNet's swish are plain gradients).

**Dual-branch sigmoid head** (Oh & Noh, BMVC 2025), target ``BranchLogit`` on a
``SigmoidBranchClassifier``: the CAM family takes its channel weights from the branch's raw logit
z_k (CAM: the branch's weight row; gradient methods: gradients of z_k), clamps them to >= 0 and
returns M = ReLU(sum_d max(w_d, 0) F_d). Score-CAM follows the authors' ``score_cam.py``: the
branch's scores of the masked inputs are clamped at 0 before the softmax over channels and no
baseline score is subtracted (``_BranchScoreCAM``). ``softcam`` returns the branch's signed maps
(their spatial mean is z_k). The class is still the softmax head's arg-max unless ``targets`` are given.

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

from bundle.explain.targets import HeadLogit, target_named
from bundle.networks.classifier import ClassEvidenceHead, ImageClassifier
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
    """Turns (images, one class per image) into an ``Explanation`` of ``target``'s score of that class.

    Subclasses give the raw map and say who they are: ``name`` (the registry key), ``title`` (as
    in the papers' tables) and ``family`` ("self-explaining", "cam" or "gradient").
    """

    name: ClassVar[str]
    title: ClassVar[str]
    family: ClassVar[str]
    supports_branch: ClassVar[bool] = False

    def __init__(self, model: ImageClassifier, target: HeadLogit | str = HeadLogit()):
        target = target_named(target)
        if target.branch and not self.supports_branch:
            raise ValueError(f"{type(self).__name__} has no sigmoid-branch variant")
        target.check(model)
        self.model = model
        self.target = target

    def __call__(self, images: torch.Tensor, targets: torch.Tensor | Sequence[int] | None = None) -> Explanation:
        """images (B, Ch, H, W[, D]); targets (B,) class indices, or None for the softmax head's arg-max."""
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

    name, title, family = "softcam", "SoftCAM", "self-explaining"
    supports_branch = True

    def __init__(self, model: ImageClassifier, target: HeadLogit | str = HeadLogit()):
        super().__init__(model, target)
        head = self.target.explaining_head(model)
        if not isinstance(head, ClassEvidenceHead):
            raise TypeError(f"softcam explains SoftCAM classifiers; this one has a {type(head).__name__}")

    def raw_maps(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _select(self.target.class_maps(self.model, images), targets)


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


class _BranchScoreCAM(ScoreCAM):
    """Score-CAM on a sigmoid branch as Oh & Noh's ``score_cam.py``: w = softmax_d(max(z_k(x * A_d), 0)),
    the branch logit of the input masked by each normalised feature map clamped at 0, with no
    baseline score subtracted (torchcam subtracts z_k(x)). Overrides two private torchcam steps:
    the baseline scores (zeros) and the masked inputs' scores (clamped)."""

    def _init_score_weights(self, activations, class_idx, targets):
        weights, target_fns, baseline_scores = super()._init_score_weights(activations, class_idx, targets)
        return weights, target_fns, torch.zeros_like(baseline_scores)

    def _score_input(self, input_tensor, sample_indices, class_idx, targets) -> torch.Tensor:
        return super()._score_input(input_tensor, sample_indices, class_idx, targets).clamp_min(0)


class TorchCAMExplainer(Explainer):
    """A torchcam extractor on the backbone's last feature map (``model.features``).

    Subclasses name the torchcam method and whether it needs gradients. ``options`` go to the
    extractor's constructor (e.g. ``batch_size`` for Score-CAM).
    """

    family = "cam"
    supports_branch = True
    method: ClassVar[type[_CAM]]
    branch_method: ClassVar[type[_CAM] | None] = None  # the method's own sigmoid-branch rule, if it has one
    uses_gradients: ClassVar[bool] = True

    def __init__(self, model: ImageClassifier, target: HeadLogit | str = HeadLogit(), **options: Any):
        super().__init__(model, target)
        self.options = options

    def extractor_options(self) -> dict[str, Any]:
        return dict(self.options)

    def extractor_class(self) -> type[_CAM]:
        if not self.target.clamps_channel_weights:
            return self.method
        return self.branch_method or _with_non_negative_weights(self.method)

    def raw_maps(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        scorer = self.target.scores(self.model)
        with self.extractor_class()(scorer, target_layer=self.model.features, **self.extractor_options()) as extractor:
            with torch.set_grad_enabled(self.uses_gradients):
                # the input carries the graph, so gradients reach the features even when every parameter is frozen
                scores = scorer(images.requires_grad_(self.uses_gradients))
            maps = extractor(class_idx=targets.tolist(), scores=scores, normalized=False)[0]
        return maps.unsqueeze(1)


class CAMExplainer(TorchCAMExplainer):
    """Class activation map (Zhou et al. 2016): the head's (or branch's) weight row of the class on the features."""

    name, title = "cam", "CAM"
    method = CAM
    uses_gradients = False

    def __init__(self, model: ImageClassifier, target: HeadLogit | str = HeadLogit(), **options: Any):
        super().__init__(model, target, **options)
        self.fc_layer = self.target.weight_layer(model)

    def extractor_options(self) -> dict[str, Any]:
        return {**self.options, "fc_layer": self.fc_layer}


class GradCAMExplainer(TorchCAMExplainer):
    """Grad-CAM (Selvaraju et al. 2017): channel weights = spatial mean of the score's gradients."""

    name, title = "gradcam", "Grad-CAM"
    method = GradCAM


class GradCAMppExplainer(TorchCAMExplainer):
    """Grad-CAM++ (Chattopadhay et al. 2018), with the paper's alpha (see ``_PaperGradCAMpp``)."""

    name, title = "gradcampp", "Grad-CAM++"
    method = _PaperGradCAMpp


class XGradCAMExplainer(TorchCAMExplainer):
    """XGrad-CAM (Fu et al. 2020): gradients weighted by the normalised activations."""

    name, title = "xgradcam", "XGrad-CAM"
    method = XGradCAM


class LayerCAMExplainer(TorchCAMExplainer):
    """LayerCAM (Jiang et al. 2021): per-location weights ReLU(gradient)."""

    name, title = "layercam", "LayerCAM"
    method = LayerCAM


class ScoreCAMExplainer(TorchCAMExplainer):
    """Score-CAM (Wang et al. 2020): channel weights from the score gain of the input masked by each
    feature map. B * D extra forward passes, ``batch_size`` (default 32) at a time."""

    name, title = "scorecam", "Score-CAM"
    method = ScoreCAM
    branch_method = _BranchScoreCAM
    uses_gradients = False


class IntegratedGradientsExplainer(Explainer):
    """Integrated Gradients (Sundararajan et al. 2017, captum) from a constant ``baseline`` image
    (0: black after windowing to [0, 1]) in ``n_steps``; raw = attributions summed over input channels."""

    name, title, family = "integrated_gradients", "Integrated Gradients", "gradient"

    def __init__(self, model: ImageClassifier, target: HeadLogit | str = HeadLogit(), n_steps: int = 32,
                 baseline: float = 0.0, internal_batch_size: int | None = None):
        super().__init__(model, target)
        self.n_steps = n_steps
        self.baseline = baseline
        self.internal_batch_size = internal_batch_size

    def raw_maps(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        attributions = IntegratedGradients(self.target.scores(self.model)).attribute(
            images, baselines=self.baseline, target=targets, n_steps=self.n_steps, internal_batch_size=self.internal_batch_size
        )
        return attributions.sum(dim=1, keepdim=True)


class GuidedBackpropExplainer(Explainer):
    """Guided Backpropagation (Springenberg et al. 2015, captum): input gradients with negative
    gradients stopped at every ``nn.ReLU``; raw = summed over input channels."""

    name, title, family = "guided_backprop", "Guided Backprop", "gradient"

    def raw_maps(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        images.requires_grad_()  # captum would set it too, with a warning on every call
        return GuidedBackprop(self.target.scores(self.model)).attribute(images, target=targets).sum(dim=1, keepdim=True)


EXPLAINERS: dict[str, type[Explainer]] = {
    method.name: method
    for method in (SoftCAMExplainer, CAMExplainer, GradCAMExplainer, GradCAMppExplainer, XGradCAMExplainer,
                   LayerCAMExplainer, ScoreCAMExplainer, IntegratedGradientsExplainer, GuidedBackpropExplainer)
}


def make_explainer(name: str, model: ImageClassifier, target: HeadLogit | str = HeadLogit(), **options: Any) -> Explainer:
    """The explainer ``name`` (a key of ``EXPLAINERS``) of ``target`` (a ``bundle.explain.targets``
    target or its name: "logit", "branch", "contrast") for ``model``; other options go to the method."""
    if name not in EXPLAINERS:
        raise ValueError(f"unknown explanation method {name!r}; choose one of {sorted(EXPLAINERS)}")
    return EXPLAINERS[name](model, target, **options)
