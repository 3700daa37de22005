"""Box localisation against lesion masks: MaxBoxAccV2, GT-Loc and Top-1 Loc, batched in torch.

Maps are raw (signed, unscaled) (B, H, W[, D]) at the masks' resolution, masks bool / 0-1 of the
same shape. Every metric thresholds the saliency S = minmax(ReLU(E)) (``bundle.explain.metrics.saliency``)
at tau * max(S): rectified, so that a signed map's zero evidence is background as a rectified map's
is. Boxes become cuboids in 3D. Per-image values are (B,) float64, NaN where the mask is empty.

MaxBoxAccV2 labels the connected components of every image at every threshold (100 per image).
On the CPU ``scipy.ndimage.label`` labels a whole batch in one call; on a GPU, where the maps
already are, a hand-written max-pooling label propagation does, because torch has no
connected-components operator and MONAI's (``get_largest_connected_component_mask``) goes through
cucim or scikit-image one image at a time. The propagation is iterative and some 100 times slower
than scipy on a CPU, so it runs only on GPUs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from bundle.explain.metrics import saliency

IOU_THRESHOLDS = (0.3, 0.5, 0.7)  # delta of MaxBoxAccV2 (Choe et al., wsolevaluation)


def _check(maps: Tensor, masks: Tensor) -> Tensor:
    """Validate shapes; return the masks as bool on the maps' device."""
    if maps.ndim not in (3, 4):
        raise ValueError(f"maps must be (B, H, W) or (B, H, W, D), got shape {tuple(maps.shape)}")
    if masks.shape != maps.shape:
        raise ValueError(f"masks {tuple(masks.shape)} and maps {tuple(maps.shape)} differ in shape")
    return masks.to(device=maps.device).bool()


def _coordinates(spatial: tuple[int, ...], device) -> Tensor:
    """Voxel coordinates (N, ndim) in raster (row-major) order, the order of ``flatten``."""
    axes = [torch.arange(s, device=device) for s in spatial]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(spatial))


def threshold_grid(thresholds: int | Tensor, device=None) -> Tensor:
    """Ascending thresholds in [0, 1): ``n`` gives 0, 1/n, ..., (n-1)/n (wsolevaluation's grid,
    ``np.arange(0, 1, cam_curve_interval)``: 100 is its interval of 0.01)."""
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


def _global_labels(foreground: Tensor) -> tuple[Tensor, int]:
    """Components of binary images (B, *S) numbered across the whole batch: int64 labels of the
    same shape, 0 on the background, 1 .. K on the components, and K."""
    if foreground.device.type != "cpu":
        labels = _propagate_labels(foreground)
        image = torch.arange(len(labels), device=labels.device).view(-1, *[1] * (labels.ndim - 1))
        keys = torch.where(labels > 0, image * (labels[0].numel() + 1) + labels, 0)
        unique, compact = torch.unique(keys, return_inverse=True)  # 0 stays 0: it sorts first
        return compact if unique[0] == 0 else compact + 1, len(unique) - int(unique[0] == 0)
    images = foreground.bool().numpy()
    # a structuring element full within an image and empty across the batch axis: one call labels every image
    structure = np.zeros((3,) * images.ndim, dtype=bool)
    structure[1] = True
    labels, count = ndimage.label(images, structure)
    return torch.from_numpy(labels).long(), int(count)


def label_components(foreground: Tensor) -> Tensor:
    """Connected components of binary images (B, H, W[, D]): 8-connectivity in 2D, 26 in 3D.

    Returns int64 labels of the same shape and device: 0 on the background, on each component a
    label in 1 .. H * W[* D] unique within its image (not necessarily consecutive). CPU tensors
    go through ``scipy.ndimage.label``, others through ``_propagate_labels``.
    """
    if foreground.device.type != "cpu":
        return _propagate_labels(foreground)
    labels, _ = _global_labels(foreground)
    # scipy numbers components across the batch in raster order: shift each image's to start at 1
    first = labels.flatten(1).masked_fill(labels.flatten(1) == 0, labels.max() + 1).amin(1)
    return torch.where(labels > 0, labels - (first - 1).view(-1, *[1] * (labels.ndim - 1)), 0)


def _propagate_labels(foreground: Tensor) -> Tensor:
    """``label_components`` in torch, batched on any device: on each component the linear
    (raster-order) index + 1 of its last voxel. Every foreground voxel starts with its own index
    + 1 and repeatedly takes the largest label of its runs along each axis and of its 3^d
    neighbourhood, until nothing changes.
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


class Components(NamedTuple):
    """The connected components of a batch of binary images, one row per component."""

    image: Tensor  # (K,) int64, the image each component lies in
    boxes: Tensor  # (K, 2 n) int64, (lo_0, .., lo_{n-1}, hi_0, .., hi_{n-1}): inclusive voxel indices along (H, W[, D])
    sizes: Tensor  # (K,) int64 voxel counts


def find_components(foreground: Tensor) -> Components:
    """Components (8-connected in 2D, 26 in 3D) of binary images (B, *S) with their bounding boxes
    (cuboids in 3D) and sizes, ordered by image and, within an image, by first voxel in raster order."""
    labels, count = _global_labels(foreground)
    spatial = tuple(labels.shape[1:])
    flat = labels.flatten()
    where = flat.nonzero()[:, 0]
    which = flat[where] - 1
    position = where
    coordinates = []
    for size in reversed((len(labels), *spatial)):  # unravel the flat index: last axis first
        coordinates.append(position % size)
        position = position // size
    image, *axes = reversed(coordinates)
    device = labels.device

    def reduce(values: Tensor, how: str, fill: int) -> Tensor:
        return torch.full((count,), fill, dtype=torch.long, device=device).scatter_reduce_(0, which, values, how)

    big = max((len(labels), *spatial))
    lows = [reduce(axis, "amin", big) for axis in axes]
    highs = [reduce(axis, "amax", -1) for axis in axes]
    sizes = torch.zeros(count, dtype=torch.long, device=device).scatter_add_(0, which, torch.ones_like(which))
    boxes = torch.stack(lows + highs, dim=1) if count else torch.zeros(0, 2 * len(spatial), dtype=torch.long, device=device)
    return Components(reduce(image, "amin", big), boxes, sizes)


def mask_boxes(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Ground-truth boxes: one per connected component of each mask (B, *spatial).

    Returns ``boxes`` (B, G, 2 * ndim), G the largest number of components in any mask (at least
    1), and ``valid`` (B, G) bool, false on unused slots.
    """
    found = find_components(masks)
    per_image = torch.bincount(found.image, minlength=len(masks))
    slots = max(int(per_image.max()) if len(masks) else 0, 1)
    start = torch.cumsum(per_image, 0) - per_image
    slot = torch.arange(len(found.image), device=masks.device) - start[found.image]
    boxes = torch.zeros(len(masks), slots, found.boxes.shape[1], dtype=torch.long, device=masks.device)
    valid = torch.zeros(len(masks), slots, dtype=torch.bool, device=masks.device)
    boxes[found.image, slot] = found.boxes
    valid[found.image, slot] = True
    return boxes, valid


def box_iou(boxes: Tensor, others: Tensor) -> Tensor:
    """Intersection over union of inclusive voxel boxes (..., K, 2n) x (..., G, 2n) -> (..., K, G)."""
    n = boxes.shape[-1] // 2
    a, b = boxes[..., :, None, :], others[..., None, :, :]
    overlap = (torch.minimum(a[..., n:], b[..., n:]) - torch.maximum(a[..., :n], b[..., :n]) + 1).clamp(min=0)
    intersection = overlap.prod(-1).double()
    volume_a = (a[..., n:] - a[..., :n] + 1).prod(-1)
    volume_b = (b[..., n:] - b[..., :n] + 1).prod(-1)
    return intersection / (volume_a + volume_b - intersection)


# --- box localisation ----------------------------------------------------------------------------


class BoxAccuracy(NamedTuple):
    """MaxBoxAccV2 and what it is made of, with the single-box (largest component) curve beside it."""

    max_box_acc: Tensor  # scalar: mean over the IoU thresholds of the best BoxAcc over tau
    box_accuracy: Tensor  # (len(iou_thresholds), T): BoxAcc(tau, delta), fraction of images hit by any box
    largest_box_accuracy: Tensor  # (len(iou_thresholds), T): the same with the largest component's box only (GT-Loc)
    thresholds: Tensor  # (T,) the tau grid
    best_iou: Tensor  # (B, T): per image and tau, best IoU of any box with any ground-truth box; NaN: empty mask
    largest_iou: Tensor  # (B, T): IoU of the largest component's box with its best ground-truth box; NaN: empty mask


def _thresholded_boxes(scaled: Tensor, taus: Tensor, gt_boxes: Tensor, gt_valid: Tensor) -> tuple[Tensor, Tensor]:
    """Best IoU of any component's box, and of the largest component's box (ties: the first in
    raster order), of S >= tau * max(S) with any ground-truth box: each (B, len(taus)); -1 where
    there is no ground-truth box."""
    batch, spatial = scaled.shape[0], tuple(scaled.shape[1:])
    peak = scaled.flatten(1).amax(1).view(batch, 1, *[1] * len(spatial))
    above = scaled[:, None] >= taus.view(1, -1, *[1] * len(spatial)) * peak
    found = find_components(above.reshape(-1, *spatial))  # map index = image * len(taus) + tau
    maps = batch * len(taus)
    source = torch.div(found.image, len(taus), rounding_mode="floor")
    iou = box_iou(found.boxes[:, None], gt_boxes[source])[:, 0].masked_fill(~gt_valid[source], -1.0).amax(1)
    every = torch.full((maps,), -1.0, dtype=torch.float64, device=scaled.device).scatter_reduce_(0, found.image, iou, "amax")
    largest_size = torch.zeros(maps, dtype=torch.long, device=scaled.device).scatter_reduce_(0, found.image, found.sizes, "amax")
    index = torch.arange(len(found.sizes), device=scaled.device)
    first_largest = torch.full((maps,), len(index), dtype=torch.long, device=scaled.device).scatter_reduce_(
        0, found.image, index.masked_fill(found.sizes != largest_size[found.image], len(index)), "amin")
    # every map has a component: tau * max(S) <= max(S) selects at least the peak
    single = iou[first_largest]
    return every.view(batch, -1), single.view(batch, -1)


def max_box_accuracy(
    maps: Tensor,
    masks: Tensor,
    thresholds: int | Tensor = 100,
    iou_thresholds: tuple[float, ...] = IOU_THRESHOLDS,
    chunk_size: int = 128,
) -> BoxAccuracy:
    """MaxBoxAccV2 (Choe et al. 2020): for each tau of the grid (default steps of 0.01, as
    wsolevaluation's ``cam_curve_interval``), a box around every connected component of
    S >= tau * max(S); an image is hit at (tau, delta) if any of its boxes has IoU >= delta with
    any ground-truth box (one per mask component). Images with an empty mask are left out. A map
    with no positive value has S = 0 everywhere, so every tau selects the whole image.
    ``largest_box_accuracy`` is the same curve with only the largest component's box: GT-Loc as
    a function of tau. ``chunk_size`` bounds how many thresholded maps are labelled at once (memory).
    """
    masks = _check(maps, masks)
    grid = threshold_grid(thresholds, maps.device)
    scaled = saliency(maps).double()
    gt_boxes, gt_valid = mask_boxes(masks)
    step = max(1, chunk_size // len(maps))
    every, single = zip(*[_thresholded_boxes(scaled, grid[i : i + step], gt_boxes, gt_valid) for i in range(0, len(grid), step)])
    annotated = gt_valid.any(1)
    best_iou = torch.where(annotated[:, None], torch.cat(every, 1), math.nan)
    largest_iou = torch.where(annotated[:, None], torch.cat(single, 1), math.nan)
    deltas = torch.tensor(iou_thresholds, dtype=torch.float64, device=maps.device).view(-1, 1, 1)
    box_accuracy = (best_iou[annotated][None] >= deltas).double().mean(1)  # NaN if no image has a mask
    largest_box_accuracy = (largest_iou[annotated][None] >= deltas).double().mean(1)
    return BoxAccuracy(box_accuracy.amax(1).mean(), box_accuracy, largest_box_accuracy, grid, best_iou, largest_iou)


def gt_localisation(maps: Tensor, masks: Tensor, threshold: float = 0.2, iou_threshold: float = 0.5) -> Tensor:
    """GT-Loc per image (B,): 1 if the box of the largest connected component (by voxel count,
    first label on ties) of S >= threshold * max(S) has IoU >= ``iou_threshold`` with a
    ground-truth box, else 0; NaN where the mask is empty. The default tau 0.2 is CAM's (Zhou et
    al. 2016) and Oh & Noh's ``loc_threshold``; ``max_box_accuracy(...).largest_box_accuracy`` gives
    it at every tau."""
    masks = _check(maps, masks)
    gt_boxes, gt_valid = mask_boxes(masks)
    taus = torch.tensor([threshold], dtype=torch.float64, device=maps.device)
    _, iou = _thresholded_boxes(saliency(maps).double(), taus, gt_boxes, gt_valid)
    return torch.where(gt_valid.any(1), (iou[:, 0] >= iou_threshold).double(), math.nan)


def top1_localisation(
    maps: Tensor, masks: Tensor, predictions: Tensor, labels: Tensor, threshold: float = 0.2, iou_threshold: float = 0.5
) -> Tensor:
    """Top-1 Loc per image (B,): GT-Loc and a correct predicted class; NaN where the mask is empty."""
    correct = (predictions.to(maps.device) == labels.to(maps.device)).double()
    return gt_localisation(maps, masks, threshold, iou_threshold) * correct
