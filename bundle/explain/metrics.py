"""Classification and explanation metrics, batched in torch on the tensors' own device.

- classification: accuracy, balanced accuracy, ROC AUC, Cohen's kappa (unweighted, linear, quadratic);
- faithfulness of a map to the model (``methods.md`` section 3): Average Drop / Increase in
  Confidence, deletion (AUDC) and insertion curves of the SoftCAM paper;
- the parameter-randomisation sanity check (Adebayo et al. 2018);
- sign consistency of signed evidence maps (SoftCAM paper).

Localisation metrics against lesion masks are in ``bundle.explain.localisation``.

Conventions: maps are raw (signed, unscaled) (B, H, W) or (B, H, W, D), at the input resolution for
the model-based metrics; each metric applies its own normalisation. Model-based metrics take a
``model`` callable returning logits (B, C) (put it in eval mode first), images (B, Ch, *spatial)
and the explained classes ``targets`` (B,), and run under ``torch.no_grad()``. Per-sample values
come back as tensors (B,), NaN where undefined; aggregate with ``torch.nanmean``.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, NamedTuple

import torch
from monai.metrics import compute_roc_auc
from torch import Tensor, nn
from torch.nn import functional as F

Model = Callable[[Tensor], Tensor]
Explainer = Callable[[nn.Module, Tensor, Tensor], Tensor]


def minmax_scale(maps: Tensor) -> Tensor:
    """Each map (B, *spatial) scaled to [0, 1] by its own minimum and maximum (float32 or wider).

    A constant map becomes all zeros: it ranks no location above another, so it carries no
    evidence anywhere.
    """
    maps = maps.to(torch.promote_types(maps.dtype, torch.float32))
    flat = maps.flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = high - low
    scaled = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, 1), 0)
    return scaled.view_as(maps)


# --- classification ------------------------------------------------------------------------------


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int | None = None) -> Tensor:
    """Counts (C, C) int64, rows = true class, columns = predicted class, from class indices (N,)."""
    predictions, labels = predictions.long().flatten(), labels.long().flatten().to(predictions.device)
    if num_classes is None:
        num_classes = int(max(predictions.max(), labels.max())) + 1
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).view(num_classes, num_classes)


def accuracy(predictions: Tensor, labels: Tensor) -> Tensor:
    """Fraction of predicted class indices (N,) equal to the labels (N,); scalar float64."""
    return (predictions.long() == labels.long().to(predictions.device)).double().mean()


def balanced_accuracy(predictions: Tensor, labels: Tensor, num_classes: int | None = None) -> Tensor:
    """Mean over the classes present in ``labels`` of the recall of each; scalar float64."""
    counts = confusion_matrix(predictions, labels, num_classes).double()
    support = counts.sum(1)
    present = support > 0
    return (counts.diagonal()[present] / support[present]).mean()


def cohen_kappa(predictions: Tensor, labels: Tensor, num_classes: int | None = None, weights: str | None = None) -> Tensor:
    """Cohen's kappa between predicted and true class indices (N,); scalar float64.

    ``weights``: None (unweighted), "linear" or "quadratic" (for ordinal grades: disagreement
    costs (i - j)^2). kappa = 1 - sum(W * O) / sum(W * E), O the observed and E the chance
    (product of marginals) joint distribution. NaN when chance disagreement is 0 (one class only).
    """
    observed = confusion_matrix(predictions, labels, num_classes).double()
    observed = observed / observed.sum()
    expected = observed.sum(1, keepdim=True) * observed.sum(0, keepdim=True)
    index = torch.arange(observed.shape[0], device=observed.device, dtype=torch.float64)
    distance = (index[:, None] - index[None, :]).abs()
    if weights is None:
        cost = (distance > 0).double()
    elif weights == "linear":
        cost = distance
    elif weights == "quadratic":
        cost = distance**2
    else:
        raise ValueError(f"weights must be None, 'linear' or 'quadratic', got {weights!r}")
    chance = (cost * expected).sum()
    return torch.where(chance > 0, 1 - (cost * observed).sum() / chance, math.nan)


def roc_auc(probabilities: Tensor, labels: Tensor) -> Tensor:
    """ROC AUC of class scores; scalar float64 (MONAI's ``compute_roc_auc``).

    ``probabilities`` (N,) positive-class scores or (N, C). Binary (C = 2): AUC of the positive
    class's column. Multi-class: macro average of one-vs-rest AUCs. NaN if a class is absent from
    ``labels`` (MONAI warns).
    """
    labels = labels.long().flatten().to(probabilities.device)
    if probabilities.ndim == 2 and probabilities.shape[1] == 2:
        probabilities = probabilities[:, 1]
    if probabilities.ndim == 1:
        value = compute_roc_auc(probabilities, labels)
    else:
        value = compute_roc_auc(probabilities, F.one_hot(labels, probabilities.shape[1]), average="macro")
    return torch.tensor(float(value), dtype=torch.float64, device=probabilities.device)


# --- faithfulness to the model -------------------------------------------------------------------


def _check_model_inputs(images: Tensor, maps: Tensor, targets: Tensor) -> None:
    if images.ndim not in (4, 5) or maps.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"maps {tuple(maps.shape)} must be (B, *spatial) of images {tuple(images.shape)} = (B, Ch, *spatial)")
    if targets.shape != (images.shape[0],):
        raise ValueError(f"targets must be (B,) = ({images.shape[0]},), got {tuple(targets.shape)}")


def target_probabilities(model: Model, images: Tensor, targets: Tensor, chunk_size: int = 64) -> Tensor:
    """Softmax probability (B,) of each image's target class, forwarding ``chunk_size`` images at a time."""
    targets = targets.long().to(images.device)
    with torch.no_grad():
        return torch.cat([
            model(images[i : i + chunk_size]).softmax(1).gather(1, targets[i : i + chunk_size, None])[:, 0]
            for i in range(0, len(images), chunk_size)
        ])


class ConfidenceChange(NamedTuple):
    """Average Drop and Increase in Confidence (Chattopadhyay et al., Grad-CAM++), per image."""

    drop: Tensor  # (B,) 100 * max(0, Y - O) / Y, percent
    increase: Tensor  # (B,) bool, O > Y

    @property
    def average_drop(self) -> Tensor:
        """Average Drop in percent (lower is better)."""
        return self.drop.nanmean()

    @property
    def increase_in_confidence(self) -> Tensor:
        """Increase in Confidence in percent (higher is better)."""
        return 100 * self.increase.double().mean()


def confidence_change(model: Model, images: Tensor, maps: Tensor, targets: Tensor, chunk_size: int = 64) -> ConfidenceChange:
    """Y = p_k(x), O = p_k(x * E) with E = minmax(map) multiplied into every channel of the
    (normalised) input. The drop is divided by Y, as torchcam does (pytorch-grad-cam does not).
    A constant map scales to zeros, so O is the probability of the all-zero (mean) image."""
    _check_model_inputs(images, maps, targets)
    explained = images * minmax_scale(maps).to(images.dtype).unsqueeze(1)
    original = target_probabilities(model, images, targets, chunk_size)
    masked = target_probabilities(model, explained, targets, chunk_size)
    return ConfidenceChange(100 * (original - masked).clamp(min=0) / original, masked > original)


class PerturbationCurve(NamedTuple):
    """A deletion or insertion curve per image."""

    fractions: Tensor  # (S,) fraction of the patches deleted / inserted, 0 .. 1
    scores: Tensor  # (B, S) min(p', p) / p at each step
    area: Tensor  # (B,) trapezoidal area under ``scores`` over ``fractions``


def _patch_ranks(maps: Tensor, patch_size: int | tuple[int, ...]) -> tuple[Tensor, int]:
    """Rank (B, *spatial) of the non-overlapping patch each voxel belongs to, 0 = highest map
    maximum (ties: patch raster order), and the number of patches. Edge patches may be smaller."""
    spatial = tuple(maps.shape[1:])
    patch = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else (int(patch_size),) * len(spatial)
    grid = [math.ceil(s / p) for s, p in zip(spatial, patch)]
    padding = [pad for s, p, g in reversed(list(zip(spatial, patch, grid))) for pad in (0, g * p - s)]
    padded = F.pad(maps.float().unsqueeze(1), padding, value=-math.inf)
    pool = F.max_pool2d if len(spatial) == 2 else F.max_pool3d
    scores = pool(padded, patch, stride=patch).flatten(1)
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=maps.device).expand_as(order))
    ranks = ranks.view(-1, *grid)
    for axis, p in enumerate(patch):
        ranks = ranks.repeat_interleave(p, dim=axis + 1)
    return ranks[(slice(None), *[slice(0, s) for s in spatial])], scores.shape[1]


def _perturbation_curve(model, images, maps, targets, patch_size, num_steps, baseline, chunk_size, insert) -> PerturbationCurve:
    _check_model_inputs(images, maps, targets)
    targets = targets.long().to(images.device)
    ranks, patches = _patch_ranks(maps.to(images.device), patch_size)
    if num_steps is None or num_steps >= patches:
        counts = torch.arange(patches + 1, device=images.device)
    else:
        counts = torch.linspace(0, patches, num_steps + 1, device=images.device).round().long().unique()
    original = target_probabilities(model, images, targets, chunk_size)
    # Every (image, step) pair is one perturbed input; chunks of them go through the model together.
    image_index = torch.arange(len(images), device=images.device).repeat_interleave(len(counts))
    step_index = torch.arange(len(counts), device=images.device).repeat(len(images))
    perturbed_scores = torch.empty(len(image_index), device=images.device, dtype=original.dtype)
    fill = torch.tensor(baseline, dtype=images.dtype, device=images.device)
    with torch.no_grad():
        for start in range(0, len(image_index), chunk_size):
            b, s = image_index[start : start + chunk_size], step_index[start : start + chunk_size]
            changed = ranks[b] < counts[s].view(-1, *[1] * (ranks.ndim - 1))  # the first counts[s] patches
            shown = changed if insert else ~changed
            x = torch.where(shown.unsqueeze(1), images[b], fill)
            perturbed_scores[start : start + len(b)] = model(x).softmax(1).gather(1, targets[b, None])[:, 0]
    scores = torch.minimum(perturbed_scores.view(len(images), -1), original[:, None]) / original[:, None]
    fractions = counts.to(scores.dtype) / patches
    return PerturbationCurve(fractions, scores, torch.trapezoid(scores, fractions, dim=1))


def deletion_curve(
    model: Model,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    patch_size: int | tuple[int, ...],
    num_steps: int | None = None,
    baseline: float = 0.0,
    chunk_size: int = 64,
) -> PerturbationCurve:
    """Deletion as in the SoftCAM paper; ``area`` is the AUDC (lower is better).

    The image is cut into non-overlapping patches of ``patch_size`` voxels (33 at 512^2 in the
    paper), ranked by the maximum of the map inside them; the top 0, 1, ..., n patches are replaced
    by ``baseline`` (0 = the dataset mean after normalisation) and the curve records
    min(p', p) / p for the target class. ``num_steps`` (default: every patch) spaces the patch
    counts evenly from 0 to n instead. ``chunk_size`` perturbed images go through the model at once.
    """
    return _perturbation_curve(model, images, maps, targets, patch_size, num_steps, baseline, chunk_size, insert=False)


def insertion_curve(
    model: Model,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    patch_size: int | tuple[int, ...],
    num_steps: int | None = None,
    baseline: float = 0.0,
    chunk_size: int = 64,
) -> PerturbationCurve:
    """Insertion, the mirror of ``deletion_curve`` (higher is better): start from the ``baseline``
    image and restore the top 0, 1, ..., n patches of the original. The curve is min(p', p) / p,
    the same normalised score as deletion, so both lie in [0, 1] and compare across images of
    different confidence (a plain p' curve would weight confident images more)."""
    return _perturbation_curve(model, images, maps, targets, patch_size, num_steps, baseline, chunk_size, insert=True)


# --- sanity check --------------------------------------------------------------------------------


def _average_ranks(values: Tensor) -> Tensor:
    """Ranks (B, N) float64 along dim 1, 0-based, ties given the mean of their positions."""
    batch, n = values.shape
    ordered, order = values.sort(dim=1)
    new_value = torch.ones_like(ordered, dtype=torch.bool)
    new_value[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = new_value.long().cumsum(1) - 1
    position = torch.arange(n, device=values.device, dtype=torch.float64).expand(batch, n)
    total = torch.zeros(batch, n, dtype=torch.float64, device=values.device).scatter_add_(1, group, position)
    count = torch.zeros_like(total).scatter_add_(1, group, torch.ones_like(position))
    mean_position = (total / count.clamp(min=1)).gather(1, group)
    return torch.empty_like(mean_position).scatter_(1, order, mean_position)


def spearman_correlation(first: Tensor, second: Tensor) -> Tensor:
    """Spearman rank correlation per sample (B,) between maps (B, ...) flattened; ties get average
    ranks. NaN where either map is constant."""
    ranks = [_average_ranks(x.flatten(1)) for x in (first, second.to(first.device))]
    a, b = (r - r.mean(1, keepdim=True) for r in ranks)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def parameterised_modules(model: nn.Module) -> list[nn.Module]:
    """Modules holding parameters of their own, in registration order (input to head for the
    bundle's classifiers)."""
    return [module for module in model.modules() if next(module.parameters(recurse=False), None) is not None]


def randomise_top_layers(model: nn.Module, num_layers: int, seed: int | None = None) -> nn.Module:
    """A deep copy of ``model`` with the last ``num_layers`` parameterised modules re-initialised
    by their own ``reset_parameters`` (cascading from the head, Adebayo et al. 2018)."""
    layers = parameterised_modules(model)
    if not 0 < num_layers <= len(layers):
        raise ValueError(f"num_layers must be in 1..{len(layers)} (parameterised modules of the model), got {num_layers}")
    # Modules may keep tensors of their last forward pass (the SoftCAM head keeps its evidence
    # maps); tensors inside an autograd graph cannot be deep-copied, so the copy holds them detached.
    cached = {id(value): value.detach().clone() for module in model.modules() for value in vars(module).values()
              if isinstance(value, Tensor) and value.grad_fn is not None}
    randomised = copy.deepcopy(model, cached)
    devices = sorted({p.device.index for p in randomised.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for module in parameterised_modules(randomised)[-num_layers:]:
            if not hasattr(module, "reset_parameters"):
                raise TypeError(f"cannot re-initialise {type(module).__name__}: it has no reset_parameters()")
            module.reset_parameters()
    return randomised


def parameter_randomisation_correlation(
    model: nn.Module, explain: Explainer, images: Tensor, targets: Tensor, num_layers: int, seed: int | None = None
) -> Tensor:
    """Spearman correlation (B,) between each image's map from ``model`` and from a copy whose last
    ``num_layers`` parameterised modules are re-initialised. ``explain(model, images, targets)``
    returns maps (B, *spatial) and may use gradients (it is not wrapped in no_grad). A map that
    follows the model decorrelates; one that ignores it stays at 1."""
    before = explain(model, images, targets).detach()
    after = explain(randomise_top_layers(model, num_layers, seed), images, targets).detach()
    return spearman_correlation(before, after)


# --- sign of the evidence ------------------------------------------------------------------------


def evidence_sign_consistency(maps: Tensor, diseased: Tensor, by: str = "area") -> Tensor:
    """Share of a raw signed evidence map (B, *spatial) with the sign its image's label calls for:
    positive on diseased images, negative on healthy ones (SoftCAM paper). Pass the map of the
    disease class. ``by="area"``: fraction of locations with that sign (zeros count as neither);
    ``by="mass"``: that sign's share of sum(|E|), NaN for an all-zero map. Returns (B,)."""
    flat = maps.flatten(1).double()
    signed = torch.where(diseased.bool().to(maps.device)[:, None], flat, -flat)
    if by == "area":
        return (signed > 0).double().mean(1)
    if by == "mass":
        return signed.clamp(min=0).sum(1) / flat.abs().sum(1)
    raise ValueError(f"by must be 'area' or 'mass', got {by!r}")
