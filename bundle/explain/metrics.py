"""Classification metrics, the normalisation of maps, and the sign of signed evidence, batched in torch.

- classification: accuracy, balanced accuracy, ROC AUC, Cohen's kappa (unweighted, linear, quadratic);
- ``minmax_scale`` and ``saliency`` (= minmax(ReLU(E))), the two normalisations the metrics use;
- sign consistency of signed evidence maps (SoftCAM reference, ``get_local_to_global_*``).

Faithfulness to the model (Average Drop, deletion, insertion, the randomisation sanity check) is in
``bundle.explain.faithfulness``; localisation against lesion masks in ``bundle.explain.localisation``
and ``bundle.explain.boxes``. Per-sample values come back as tensors (B,), NaN where undefined;
aggregate with ``torch.nanmean``.
"""

from __future__ import annotations

import math

import torch
from monai.metrics import compute_roc_auc
from torch import Tensor
from torch.nn import functional as F


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


def saliency(maps: Tensor) -> Tensor:
    """Non-negative saliency S = minmax(ReLU(E)) of raw maps (B, *spatial), in [0, 1], same shape.

    Rectified before scaling, as pytorch-grad-cam's ``BaseCAM`` does, so that zero evidence is 0
    whatever the map's sign convention: a signed map (SoftCAM, CAM, Integrated Gradients) and a
    rectified one (Grad-CAM) with the same positive part get the same saliency. A map with no
    positive value is all zeros (it points nowhere).
    """
    return minmax_scale(maps.clamp(min=0))


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


# --- rank correlation ----------------------------------------------------------------------------


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


# --- sign of the evidence ------------------------------------------------------------------------


def disease_classes(labels: Tensor, logits: Tensor) -> Tensor:
    """The disease class whose map sign consistency reads, per image (B,) int64: the label of a
    diseased image (label > 0); on a healthy image (label 0) the disease class the model scores
    highest (logits (B, C)), which is class 1 whenever there are two classes."""
    labels = labels.long().to(logits.device)
    if logits.shape[1] < 2:
        raise ValueError(f"sign consistency needs a healthy and at least one disease class, got logits {tuple(logits.shape)}")
    return torch.where(labels > 0, labels, logits[:, 1:].argmax(1) + 1)


def evidence_sign_consistency(maps: Tensor, diseased: Tensor, by: str = "area") -> Tensor:
    """Share of a raw signed evidence map (B, *spatial) with the sign its image's label calls for:
    positive on diseased images, negative on healthy ones (SoftCAM reference,
    ``get_local_to_global_positive`` / ``_negative``). Pass the disease class's map on every image
    (``disease_classes``), not the predicted class's. ``by="area"`` (the reference): fraction of
    locations with that sign, zeros counting as neither; the reference pools locations over the
    images of a group, which for maps of one size is the mean of these values. ``by="mass"``: that
    sign's share of sum(|E|), NaN for an all-zero map. Returns (B,)."""
    flat = maps.flatten(1).double()
    signed = torch.where(diseased.bool().to(maps.device)[:, None], flat, -flat)
    if by == "area":
        return (signed > 0).double().mean(1)
    if by == "mass":
        return signed.clamp(min=0).sum(1) / flat.abs().sum(1)
    raise ValueError(f"by must be 'area' or 'mass', got {by!r}")
