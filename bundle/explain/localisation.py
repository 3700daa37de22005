"""Localisation metrics: how well explanation maps point at lesion masks, batched in torch.

Maps are raw (signed, unscaled) explanation maps at the masks' resolution, (B, H, W) or
(B, H, W, D); masks are bool / 0-1 tensors of the same shape. Every metric applies its own
normalisation (``methods.md`` section 3) and runs on the maps' device. Per-image metrics return
float tensors (B,), NaN where the mask is empty (a healthy image: nothing to localise); aggregate
them with ``torch.nanmean``. Boxes become cuboids in 3D.

Connected components are labelled here by max-pooling label propagation because torch has no
connected-components operator, and MONAI's (``get_largest_connected_component_mask``) goes through
cucim or scikit-image one image at a time; MaxBoxAccV2 needs every image at every threshold at
once, on the GPU when there is one, in 2D and 3D.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from bundle.explain.metrics import minmax_scale

IOU_THRESHOLDS = (0.3, 0.5, 0.7)  # delta of MaxBoxAccV2 (Choe et al., wsolevaluation)


def _check(maps: Tensor, masks: Tensor) -> Tensor:
    """Validate shapes; return the masks as bool on the maps' device."""
    if maps.ndim not in (3, 4):
        raise ValueError(f"maps must be (B, H, W) or (B, H, W, D), got shape {tuple(maps.shape)}")
    if masks.shape != maps.shape:
        raise ValueError(f"masks {tuple(masks.shape)} and maps {tuple(maps.shape)} differ in shape")
    return masks.to(device=maps.device).bool()


def _max_pool(x: Tensor, kernel_size, stride=1, padding=0) -> Tensor:
    pool = F.max_pool2d if x.ndim == 4 else F.max_pool3d
    return pool(x, kernel_size, stride=stride, padding=padding)


def _as_tuple(value, spatial_dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * spatial_dims


def _coordinates(spatial: tuple[int, ...], device) -> Tensor:
    """Voxel coordinates (N, ndim) in raster (row-major) order, the order of ``flatten``."""
    axes = [torch.arange(s, device=device) for s in spatial]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(spatial))


def _nan_where_empty(values: Tensor, masks: Tensor) -> Tensor:
    return torch.where(masks.flatten(1).any(1), values.double(), math.nan)


def threshold_grid(thresholds: int | Tensor, device=None) -> Tensor:
    """Ascending thresholds in [0, 1): ``n`` gives 0, 1/n, ..., (n-1)/n (wsolevaluation's grid)."""
    if isinstance(thresholds, int):
        return torch.arange(thresholds, device=device, dtype=torch.float64) / thresholds
    return torch.as_tensor(thresholds, device=device, dtype=torch.float64).sort().values


# --- connected components and boxes --------------------------------------------------------------


def _neighbourhood_maximum(labels: Tensor) -> Tensor:
    """Maximum over each voxel's 3^d neighbourhood (B, *spatial), separably, one axis at a time."""
    for axis in range(1, labels.ndim):
        size = labels.shape[axis]
        widened = labels.clone()
        below, above = widened.narrow(axis, 1, size - 1), widened.narrow(axis, 0, size - 1)  # views into widened
        below.copy_(torch.maximum(below, labels.narrow(axis, 0, size - 1)))
        above.copy_(torch.maximum(above, labels.narrow(axis, 1, size - 1)))
        labels = widened
    return labels


def label_components(foreground: Tensor) -> Tensor:
    """Connected components of binary images (B, H, W[, D]): 8-connectivity in 2D, 26 in 3D.

    Returns int64 labels of the same shape: 0 on the background; on each component the linear
    (raster-order) index + 1 of its last voxel, so labels are unique within an image but not
    consecutive. Every foreground voxel starts with its own index + 1 and repeatedly takes the
    largest label of its runs along each axis and of its 3^d neighbourhood, until nothing changes.
    """
    foreground = foreground.bool()
    batch, spatial = foreground.shape[0], tuple(foreground.shape[1:])
    voxels = math.prod(spatial)
    # Sweep keys run * (voxels + 1) + label must fit the label type.
    dtype = torch.int32 if (max(spatial) + 1) * (voxels + 1) < 2**31 else torch.int64
    labels = torch.where(foreground, torch.arange(1, voxels + 1, device=foreground.device, dtype=dtype).view(1, *spatial), 0)
    # A run is a stretch of consecutive foreground voxels along one axis; a cumulative maximum over
    # run * (voxels + 1) + label, forwards and backwards, gives each voxel its run's largest label
    # in one step, so blobs converge in a few iterations rather than in their diameter.
    sweeps = []
    for axis in range(1, len(spatial) + 1):
        for flip in (False, True):
            background = ~(foreground.flip(axis) if flip else foreground)
            sweeps.append((axis, flip, background.to(dtype).cumsum(axis, dtype=dtype) * (voxels + 1)))
    while True:
        for axis, flip, run in sweeps:  # background voxels start a run of their own and keep 0
            swept = ((labels.flip(axis) if flip else labels) + run).cummax(axis).values - run
            labels = swept.flip(axis) if flip else swept
        grown = torch.where(foreground, _neighbourhood_maximum(labels), 0)  # diagonal contacts
        if torch.equal(grown, labels):  # every label is the largest around it: one label per component
            return labels.long()
        # Pointer jumping: a label names a voxel of the same component whose own label is at least
        # as large; taking that voxel's label shortcuts winding paths.
        flat = grown.view(batch, voxels)
        labels = torch.where(foreground, flat.gather(1, (flat.long() - 1).clamp(min=0)).view_as(grown), 0)


def component_boxes(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Bounding boxes (cuboids in 3D) of labelled components, labels (B, *spatial), 0 = background.

    Returns ``boxes`` (B, K, 2 * ndim) int64 as (lo_0, .., lo_{n-1}, hi_0, .., hi_{n-1}), inclusive
    voxel indices along (H, W[, D]), and ``sizes`` (B, K), the voxel count of each component.
    K is the largest number of components in any image (at least 1); unused slots have size 0.
    """
    batch, spatial = labels.shape[0], tuple(labels.shape[1:])
    voxels = math.prod(spatial)
    flat = labels.reshape(batch, voxels)
    sizes = torch.zeros(batch, voxels + 1, dtype=torch.long, device=labels.device)
    sizes.scatter_add_(1, flat, torch.ones_like(flat))
    sizes[:, 0] = 0
    present = sizes > 0
    slots_needed = max(int(present.sum(1).max()), 1)
    slots = present.int().argsort(dim=1, descending=True, stable=True)[:, :slots_needed]
    lows, highs = [], []
    for axis in _coordinates(spatial, labels.device).T.unbind(0):
        axis = axis.expand(batch, voxels)
        low = torch.full((batch, voxels + 1), voxels, dtype=torch.long, device=labels.device)
        high = torch.full((batch, voxels + 1), -1, dtype=torch.long, device=labels.device)
        lows.append(low.scatter_reduce_(1, flat, axis, "amin").gather(1, slots))
        highs.append(high.scatter_reduce_(1, flat, axis, "amax").gather(1, slots))
    return torch.stack(lows + highs, dim=-1), sizes.gather(1, slots)


def mask_boxes(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Ground-truth boxes: one per connected component of each mask (B, *spatial).

    Returns ``boxes`` (B, G, 2 * ndim) and ``valid`` (B, G) bool (see ``component_boxes``).
    """
    boxes, sizes = component_boxes(label_components(masks))
    return boxes, sizes > 0


def box_iou(boxes: Tensor, others: Tensor) -> Tensor:
    """Intersection over union of inclusive voxel boxes (..., K, 2n) x (..., G, 2n) -> (..., K, G)."""
    n = boxes.shape[-1] // 2
    a, b = boxes[..., :, None, :], others[..., None, :, :]
    overlap = (torch.minimum(a[..., n:], b[..., n:]) - torch.maximum(a[..., :n], b[..., :n]) + 1).clamp(min=0)
    intersection = overlap.prod(-1).double()
    volume_a = (a[..., n:] - a[..., :n] + 1).prod(-1)
    volume_b = (b[..., n:] - b[..., :n] + 1).prod(-1)
    return intersection / (volume_a + volume_b - intersection)


def _best_iou(boxes: Tensor, valid: Tensor, gt_boxes: Tensor, gt_valid: Tensor) -> Tensor:
    """Largest IoU between any valid box (N, K) and any valid ground-truth box (N, G): (N,), -1 if none."""
    iou = box_iou(boxes, gt_boxes).masked_fill(~(valid[:, :, None] & gt_valid[:, None, :]), -1.0)
    return iou.flatten(1).amax(1)


# --- saliency mass and peaks ---------------------------------------------------------------------


def _positive_saliency(maps: Tensor) -> Tensor:
    """S = minmax(ReLU(E)) (B, N); all zeros where E has no positive contrast (constant or <= 0)."""
    return minmax_scale(maps.clamp(min=0)).flatten(1)


def activation_precision(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of the positive saliency inside the mask, sum(S * M) / sum(S), per image (B,).

    S = minmax(ReLU(E)). A map with no positive contrast (S = 0 everywhere: constant or
    non-positive) points nowhere and scores 0. NaN where the mask is empty.
    """
    masks = _check(maps, masks)
    saliency = _positive_saliency(maps)
    inside = (saliency * masks.flatten(1)).sum(1)
    total = saliency.sum(1)
    return _nan_where_empty(torch.where(total > 0, inside / total.clamp(min=1e-30), 0.0), masks)


def activation_sensitivity(maps: Tensor, masks: Tensor) -> Tensor:
    """Mean positive saliency over the mask, sum(S * M) / sum(M), per image (B,); NaN where the mask
    is empty. S = minmax(ReLU(E)), so a map with no positive contrast scores 0."""
    masks = _check(maps, masks)
    mask = masks.flatten(1)
    inside = (_positive_saliency(maps) * mask).sum(1)
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


def top_k_localisation_precision(
    maps: Tensor, masks: Tensor, k: int, patch_size: int | tuple[int, ...], min_distance: int | tuple[int, ...] | None = None
) -> Tensor:
    """Top-k localisation precision (Sparse-BagNet): hits / picked over the k highest local maxima.

    Local maxima are voxels equal to the maximum of their 3^d neighbourhood (plateaus included).
    They are picked greedily from the highest, each pick removing the candidates closer than
    ``min_distance`` (Chebyshev, per axis; default ``patch_size``, so picked patches do not
    overlap). Each pick stands for its receptive patch, ``patch_size`` voxels centred on it
    (starting ``patch_size // 2`` before it, clipped at the border); a pick is a hit if its patch
    touches the mask. Fewer than k picks happen only when the candidates run out; the precision
    is then over the picks made. Returns (B,), NaN where the mask is empty.
    """
    masks = _check(maps, masks)
    spatial = tuple(maps.shape[1:])
    patch = torch.tensor(_as_tuple(patch_size, len(spatial)), device=maps.device)
    spacing = torch.tensor(_as_tuple(patch_size if min_distance is None else min_distance, len(spatial)), device=maps.device)
    coords = _coordinates(spatial, maps.device)
    mask = masks.flatten(1)
    x = maps.float().unsqueeze(1)
    peaks = (x == _max_pool(x, 3, 1, 1)).flatten(1)
    candidates = x.flatten(1).masked_fill(~peaks, -math.inf)
    hits = torch.zeros(maps.shape[0], device=maps.device)
    picked = torch.zeros_like(hits)
    for _ in range(k):
        best, index = candidates.max(1)
        found = best > -math.inf
        centre = coords[index]
        low = centre - patch // 2
        in_patch = ((coords[None] >= low[:, None]) & (coords[None] <= (low + patch - 1)[:, None])).all(-1)
        hits += found & (in_patch & mask).any(1)
        picked += found
        near = ((coords[None] - centre[:, None]).abs() < spacing).all(-1)
        candidates = candidates.masked_fill(near, -math.inf)
    return _nan_where_empty(hits / picked.clamp(min=1), masks)


# --- pixel-level precision-recall ----------------------------------------------------------------


def _pixel_histograms(maps: Tensor, masks: Tensor, thresholds: int | Tensor) -> tuple[Tensor, Tensor]:
    """Per image, counts of mask / background voxels by the number of thresholds their min-max
    scaled value reaches: (B, T + 1) each, float64."""
    grid = threshold_grid(thresholds, maps.device)
    scaled = minmax_scale(maps).flatten(1).double().contiguous()
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
    """PxAP per image (B,): area under the pixel-level precision-recall curve of the min-max scaled
    map against the mask, over ``thresholds`` (a count or an ascending grid in [0, 1)); a voxel is
    predicted positive when its value is >= the threshold. A constant map scales to zeros and
    scores the mask fraction. NaN where the mask is empty."""
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


# --- box localisation ----------------------------------------------------------------------------


class BoxAccuracy(NamedTuple):
    """MaxBoxAccV2 and what it is made of."""

    max_box_acc: Tensor  # scalar: mean over the IoU thresholds of the best BoxAcc over tau
    box_accuracy: Tensor  # (len(iou_thresholds), T): BoxAcc(tau, delta), fraction of images hit
    thresholds: Tensor  # (T,) the tau grid
    best_iou: Tensor  # (B, T): per image and tau, best IoU of any box with any ground-truth box; NaN: empty mask


def max_box_accuracy(
    maps: Tensor,
    masks: Tensor,
    thresholds: int | Tensor = 100,
    iou_thresholds: tuple[float, ...] = IOU_THRESHOLDS,
    chunk_size: int = 128,
) -> BoxAccuracy:
    """MaxBoxAccV2 (Choe et al. 2020): for each tau, a box around every connected component of
    E >= tau * max(E) (E min-max scaled); an image is hit at (tau, delta) if any of its boxes has
    IoU >= delta with any ground-truth box (one per mask component). Images with an empty mask are
    left out. A constant map scales to zeros, so every tau selects the whole image.
    ``chunk_size`` bounds how many thresholded maps are labelled at once (memory).
    """
    masks = _check(maps, masks)
    batch, spatial = maps.shape[0], tuple(maps.shape[1:])
    grid = threshold_grid(thresholds, maps.device)
    scaled = minmax_scale(maps).double()
    peak = scaled.flatten(1).amax(1).view(batch, 1, *[1] * len(spatial))
    gt_boxes, gt_valid = mask_boxes(masks)
    step = max(1, chunk_size // batch)
    best = []
    for start in range(0, len(grid), step):
        taus = grid[start : start + step]
        above = scaled[:, None] >= taus.view(1, -1, *[1] * len(spatial)) * peak
        boxes, sizes = component_boxes(label_components(above.reshape(-1, *spatial)))
        repeat = len(taus)
        iou = _best_iou(boxes, sizes > 0, gt_boxes.repeat_interleave(repeat, 0), gt_valid.repeat_interleave(repeat, 0))
        best.append(iou.view(batch, repeat))
    best_iou = torch.where(gt_valid.any(1, keepdim=True), torch.cat(best, 1), math.nan)
    annotated = best_iou[gt_valid.any(1)]
    deltas = torch.tensor(iou_thresholds, dtype=torch.float64, device=maps.device)
    box_accuracy = (annotated[None] >= deltas.view(-1, 1, 1)).double().mean(1)  # NaN if no image has a mask
    return BoxAccuracy(box_accuracy.amax(1).mean(), box_accuracy, grid, best_iou)


def gt_localisation(maps: Tensor, masks: Tensor, threshold: float = 0.2, iou_threshold: float = 0.5) -> Tensor:
    """GT-Loc per image (B,): 1 if the box of the largest connected component (by voxel count,
    first label on ties) of E >= threshold * max(E) (E min-max scaled) has IoU >= ``iou_threshold``
    with a ground-truth box, else 0; NaN where the mask is empty. The default 0.2 is CAM's
    (Zhou et al. 2016) fixed threshold."""
    masks = _check(maps, masks)
    scaled = minmax_scale(maps)
    peak = scaled.flatten(1).amax(1).view(-1, *[1] * (maps.ndim - 1))
    boxes, sizes = component_boxes(label_components(scaled >= threshold * peak))
    largest = boxes.gather(1, sizes.argmax(1).view(-1, 1, 1).expand(-1, 1, boxes.shape[-1]))
    gt_boxes, gt_valid = mask_boxes(masks)
    iou = _best_iou(largest, torch.ones_like(largest[..., 0], dtype=torch.bool), gt_boxes, gt_valid)
    return _nan_where_empty((iou >= iou_threshold).double(), masks)


def top1_localisation(
    maps: Tensor, masks: Tensor, predictions: Tensor, labels: Tensor, threshold: float = 0.2, iou_threshold: float = 0.5
) -> Tensor:
    """Top-1 Loc per image (B,): GT-Loc and a correct predicted class; NaN where the mask is empty."""
    correct = (predictions.to(maps.device) == labels.to(maps.device)).double()
    return gt_localisation(maps, masks, threshold, iou_threshold) * correct
