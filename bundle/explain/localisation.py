"""Localisation metrics: how well explanation maps point at lesion masks, batched in torch.

Maps are raw (signed, unscaled) explanation maps at the masks' resolution, (B, H, W) or
(B, H, W, D); masks are bool / 0-1 tensors of the same shape. Metrics about where the positive
evidence is use the saliency S = minmax(ReLU(E)) (``bundle.explain.metrics.saliency``); top-k
precision and the pointing game read the raw map's order. Per-image metrics return float tensors
(B,), NaN where the mask is empty (a healthy image: nothing to localise); aggregate them with
``torch.nanmean``. Box metrics (MaxBoxAccV2, GT-Loc, Top-1 Loc) are in ``bundle.explain.boxes``.

``ideal_maps`` and ``random_maps`` give the ceiling and the chance level of every metric at a map
resolution: the mask pooled to the evidence grid and a seeded random map, both upsampled as the
explainers upsample their maps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from bundle.explain.boxes import _check, _coordinates, threshold_grid
from bundle.explain.metrics import saliency
from bundle.visualize import upsample


def _max_pool(x: Tensor, kernel_size, stride=1, padding=0) -> Tensor:
    pool = F.max_pool2d if x.ndim == 4 else F.max_pool3d
    return pool(x, kernel_size, stride=stride, padding=padding)


def _as_tuple(value, spatial_dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * spatial_dims


def _nan_where_empty(values: Tensor, masks: Tensor) -> Tensor:
    return torch.where(masks.flatten(1).any(1), values.double(), math.nan)


# --- saliency mass and peaks ---------------------------------------------------------------------


def activation_precision(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of the positive saliency inside the mask, sum(S * M) / sum(S), per image (B,).

    S = minmax(ReLU(E)). A map with no positive contrast (S = 0 everywhere: constant or
    non-positive) points nowhere and scores 0. NaN where the mask is empty.
    """
    masks = _check(maps, masks)
    s = saliency(maps).flatten(1)
    inside = (s * masks.flatten(1)).sum(1)
    total = s.sum(1)
    return _nan_where_empty(torch.where(total > 0, inside / total.clamp(min=1e-30), 0.0), masks)


def activation_sensitivity(maps: Tensor, masks: Tensor) -> Tensor:
    """Mean positive saliency over the mask, sum(S * M) / sum(M), per image (B,); NaN where the mask
    is empty. S = minmax(ReLU(E)), so a map with no positive contrast scores 0."""
    masks = _check(maps, masks)
    mask = masks.flatten(1)
    inside = (saliency(maps).flatten(1) * mask).sum(1)
    return _nan_where_empty(inside / mask.sum(1).clamp(min=1), masks)


def pointing_game(maps: Tensor, masks: Tensor, tolerance: float = 0.0) -> Tensor:
    """1 where the map's maximum lies in the mask or within ``tolerance`` voxels (Euclidean) of it,
    else 0, per image (B,); NaN where the mask is empty.

    Ties: the first maximum in raster order counts (``torch.argmax``), so a constant map points
    at voxel (0, 0[, 0]).
    """
    masks = _check(maps, masks)
    coords = _coordinates(tuple(maps.shape[1:]), maps.device)
    peak = coords[maps.flatten(1).argmax(1)]
    distance2 = ((coords[None] - peak[:, None]) ** 2).sum(-1)
    hit = ((distance2 <= tolerance**2) & masks.flatten(1)).any(1)
    return _nan_where_empty(hit.double(), masks)


class TopKPicks(NamedTuple):
    """Top-k localisation picks per image; ``precision`` pools them over images."""

    hits: Tensor  # (B,) picks whose patch touches the mask; NaN where the mask is empty
    picks: Tensor  # (B,) picks made (at most k, only evidence above the threshold); NaN where the mask is empty

    @property
    def precision(self) -> Tensor:
        """Hits over picks, both summed over the annotated images (the reference's mean over every
        pick of every image); NaN when no image had a pick."""
        picks = self.picks.nansum()
        return torch.where(picks > 0, self.hits.nansum() / picks.clamp(min=1), math.nan)


def top_k_localisation_precision(
    maps: Tensor,
    masks: Tensor,
    k: int,
    patch_size: int | tuple[int, ...],
    threshold: float = 0.0,
    min_distance: int | tuple[int, ...] | None = None,
) -> TopKPicks:
    """Top-k localisation precision (Sparse-BagNet; the SoftCAM reference's ``topK_patches``).

    Voxels are visited from the highest value down (ties in raster order) while their value is
    above ``threshold``; a voxel is picked unless a voxel visited before it lies closer than
    ``min_distance`` (Chebyshev, per axis; default half the patch, so patches may overlap by half
    as the reference's do), and at most ``k`` are picked. Each pick stands for its receptive
    patch, ``patch_size`` voxels centred on it (starting ``patch_size // 2`` before it, clipped at
    the border), a hit if it touches the mask. Only evidence above the threshold is picked, so a
    map equal to the mask picks only inside the lesion and scores 1 even on a one-lesion image.
    Returns hits and picks per image; ``.precision`` pools them.
    """
    masks = _check(maps, masks)
    spatial = tuple(maps.shape[1:])
    patch = _as_tuple(patch_size, len(spatial))
    spacing = _as_tuple([max(1, p // 2) for p in patch] if min_distance is None else min_distance, len(spatial))
    values = maps.flatten(1)
    voxels = values.shape[1]
    # Rank of every voxel in the visiting order; a voxel is picked iff it has the lowest rank of its window.
    order = torch.argsort(values, dim=1, descending=True, stable=True)
    rank_dtype = torch.float32 if voxels < 2**24 else torch.float64  # ranks must stay exact
    ranks = torch.empty_like(values, dtype=rank_dtype).scatter_(
        1, order, torch.arange(voxels, device=maps.device, dtype=rank_dtype).expand(len(values), -1))
    window = [2 * s - 1 for s in spacing]
    first_in_window = -_max_pool(-ranks.view(-1, 1, *spatial), window, 1, [s - 1 for s in spacing]).flatten(1)
    candidate = (ranks == first_in_window) & (values > threshold)
    picked_rank, picked = ranks.masked_fill(~candidate, math.inf).topk(min(k, voxels), dim=1, largest=False)
    made = picked_rank < math.inf
    # a pick hits if the mask reaches into the patch around it: the mask max-pooled over patch windows
    touches = _max_pool(masks.float().unsqueeze(1), patch, 1, [p // 2 for p in patch])
    touches = touches[(slice(None), 0, *[slice(0, s) for s in spatial])].flatten(1) > 0
    hits = (touches.gather(1, picked) & made).sum(1)
    return TopKPicks(_nan_where_empty(hits, masks), _nan_where_empty(made.sum(1), masks))


# --- pixel-level precision-recall ----------------------------------------------------------------


def _pixel_histograms(maps: Tensor, masks: Tensor, thresholds: int | Tensor) -> tuple[Tensor, Tensor]:
    """Per image, counts of mask / background voxels by the number of thresholds their saliency
    minmax(ReLU(E)) reaches: (B, T + 1) each, float64."""
    grid = threshold_grid(thresholds, maps.device)
    scaled = saliency(maps).flatten(1).double().contiguous()
    bins = torch.searchsorted(grid, scaled, right=True)  # value >= grid[j]  <=>  bin >= j + 1
    mask = masks.flatten(1).double()
    inside = torch.zeros(maps.shape[0], len(grid) + 1, dtype=torch.float64, device=maps.device)
    outside = torch.zeros_like(inside)
    return inside.scatter_add_(1, bins, mask), outside.scatter_add_(1, bins, 1 - mask)


def _average_precision(inside: Tensor, outside: Tensor) -> Tensor:
    """Area under the precision-recall curve from (..., T + 1) histograms, thresholds descending:
    sum_j precision_j * (recall_j - recall_{j-1}), starting at recall 0 (wsolevaluation's sum)."""
    thresholds = inside.shape[-1] - 1
    true_positives = inside.flip(-1).cumsum(-1)[..., :thresholds]
    false_positives = outside.flip(-1).cumsum(-1)[..., :thresholds]
    zero = torch.zeros_like(inside[..., :1])
    true_positives, false_positives = torch.cat([zero, true_positives], -1), torch.cat([zero, false_positives], -1)
    predicted = true_positives + false_positives
    precision = torch.where(predicted > 0, true_positives / predicted.clamp(min=1), 0.0)
    recall = true_positives / inside.sum(-1, keepdim=True).clamp(min=1)
    return (precision[..., 1:] * recall.diff(dim=-1)).sum(-1)


def pxap(maps: Tensor, masks: Tensor, thresholds: int | Tensor = 100) -> Tensor:
    """PxAP per image (B,): area under the pixel-level precision-recall curve of the saliency
    S = minmax(ReLU(E)) against the mask, over ``thresholds`` (a count or an ascending grid in
    [0, 1)); a voxel is predicted positive when S >= the threshold. A map with no positive
    contrast has S = 0 everywhere and scores the mask fraction. NaN where the mask is empty."""
    masks = _check(maps, masks)
    return _nan_where_empty(_average_precision(*_pixel_histograms(maps, masks, thresholds)), masks)


def pxap_dataset(maps: Tensor, masks: Tensor, thresholds: int | Tensor = 100) -> Tensor:
    """PxAP as wsolevaluation reports it: one precision-recall curve over the voxels of all images
    with a non-empty mask pooled together (not the mean of per-image PxAP). Scalar; NaN if no mask."""
    masks = _check(maps, masks)
    keep = masks.flatten(1).any(1)
    if not keep.any():
        return torch.tensor(math.nan, dtype=torch.float64, device=maps.device)
    inside, outside = _pixel_histograms(maps[keep], masks[keep], thresholds)
    return _average_precision(inside.sum(0), outside.sum(0))


# --- ceilings and chance --------------------------------------------------------------------------


def ideal_maps(masks: Tensor, grid: tuple[int, ...]) -> Tensor:
    """The best map a method with ``grid`` cells (h, w[, d]) can give: each cell the share of it the
    lesion covers (adaptive average pooling of the mask), upsampled to the masks' size as the
    explainers upsample their maps (``bundle.visualize.upsample``). masks (B, *S) -> (B, *S)
    float32; at the masks' own resolution, the mask itself."""
    spatial = tuple(masks.shape[1:])
    x = masks.float().unsqueeze(1)
    if tuple(grid) == spatial:
        return x[:, 0]
    pool = F.adaptive_avg_pool2d if len(spatial) == 2 else F.adaptive_avg_pool3d
    return upsample(pool(x, tuple(grid)), spatial)[:, 0]


def random_maps(shape: tuple[int, ...], grid: tuple[int, ...], seed: int = 0, device=None) -> Tensor:
    """Chance: uniform noise in [0, 1) on ``grid`` cells (seeded), upsampled to ``shape`` (B, *S)
    as the explainers upsample their maps; (B, *S) float32."""
    batch, spatial = shape[0], tuple(shape[1:])
    noise = torch.rand(batch, 1, *grid, generator=torch.Generator().manual_seed(seed)).to(device)
    return noise[:, 0] if tuple(grid) == spatial else upsample(noise, spatial)[:, 0]
