"""Faithfulness of explanation maps to the model, batched in torch on the images' device.

- Average Drop / Increase in Confidence (Grad-CAM++), the map as a soft mask on the input;
- deletion and insertion curves as the SoftCAM reference's ``get_deletion_analysis``: patches
  removed (or restored) one at a time in the map's order for the first few, with the same curve in
  a random patch order (``random_patch_maps``) as the baseline every map has to beat;
- the parameter-randomisation sanity check (Adebayo et al. 2018).

Maps are raw (signed, unscaled) (B, H, W[, D]) at the input resolution; each metric applies its
own normalisation. ``model`` is a callable returning logits (B, C) (put it in eval mode first);
images are (B, Ch, *spatial) and ``targets`` (B,) the explained classes; model-based metrics run
under ``torch.no_grad()`` and forward ``chunk_size`` images at a time.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bundle.explain.metrics import saliency, spearman_correlation

Model = Callable[[Tensor], Tensor]
Explain = Callable[[nn.Module, Tensor, Tensor], Tensor]


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
    """Y = p_k(x), O = p_k(x * S) with S = minmax(ReLU(map)) multiplied into every channel of the
    (normalised) input: rectified first, as pytorch-grad-cam's ``BaseCAM`` does, so zero evidence
    blanks a location whatever the map's sign. The drop is divided by Y, as torchcam does
    (pytorch-grad-cam does not). A map with no positive value blanks the whole image."""
    _check_model_inputs(images, maps, targets)
    explained = images * saliency(maps).to(images.dtype).unsqueeze(1)
    original = target_probabilities(model, images, targets, chunk_size)
    masked = target_probabilities(model, explained, targets, chunk_size)
    return ConfidenceChange(100 * (original - masked).clamp(min=0) / original, masked > original)


# --- deletion and insertion ----------------------------------------------------------------------


class PerturbationCurve(NamedTuple):
    """A deletion or insertion curve per image."""

    counts: Tensor  # (S,) patches deleted / inserted at each step, 0, 1, ..., N
    fractions: Tensor  # (S,) counts / N, 0 .. 1: the curve's x axis (the reference's linspace(0, 1, N + 1))
    scores: Tensor  # (B, S) min(p', p) / p at each step
    area: Tensor  # (B,) trapezoidal area under ``scores`` over ``fractions``


def _patch_grid(spatial: tuple[int, ...], patch_size: int | tuple[int, ...]) -> tuple[tuple[int, ...], list[int]]:
    patch = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else (int(patch_size),) * len(spatial)
    return patch, [math.ceil(s / p) for s, p in zip(spatial, patch)]


def _to_voxels(per_patch: Tensor, patch: tuple[int, ...], spatial: tuple[int, ...]) -> Tensor:
    """Per-patch values (B, *grid) repeated over each patch's voxels and cropped to (B, *spatial)."""
    for axis, p in enumerate(patch):
        per_patch = per_patch.repeat_interleave(p, dim=axis + 1)
    return per_patch[(slice(None), *[slice(0, s) for s in spatial])]


def count_patches(spatial: tuple[int, ...], patch_size: int | tuple[int, ...]) -> int:
    """How many non-overlapping patches (edge patches may be smaller) tile an image of ``spatial`` size."""
    return math.prod(_patch_grid(tuple(spatial), patch_size)[1])


def _patch_ranks(maps: Tensor, patch_size: int | tuple[int, ...]) -> Tensor:
    """Rank (B, *spatial) of the non-overlapping patch each voxel belongs to, 0 = highest map
    maximum (as the reference's ``extract_patch``; ties: patch raster order)."""
    spatial = tuple(maps.shape[1:])
    patch, grid = _patch_grid(spatial, patch_size)
    padding = [pad for s, p, g in reversed(list(zip(spatial, patch, grid))) for pad in (0, g * p - s)]
    padded = F.pad(maps.float().unsqueeze(1), padding, value=-math.inf)
    pool = F.max_pool2d if len(spatial) == 2 else F.max_pool3d
    scores = pool(padded, patch, stride=patch).flatten(1)
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=maps.device).expand_as(order))
    return _to_voxels(ranks.view(-1, *grid), patch, spatial)


def random_patch_maps(shape: tuple[int, ...], patch_size: int | tuple[int, ...], seed: int = 0, device=None) -> Tensor:
    """Maps (B, *spatial) constant on each patch with a seeded uniform value: a random patch order,
    the same for every model given the same seed, for the baseline curves of deletion and insertion."""
    batch, spatial = shape[0], tuple(shape[1:])
    patch, grid = _patch_grid(spatial, patch_size)
    values = torch.rand(batch, *grid, generator=torch.Generator().manual_seed(seed))
    return _to_voxels(values, patch, spatial).to(device)


def _perturbation_curve(model, images, maps, targets, patch_size, num_patches, baseline, chunk_size, insert) -> PerturbationCurve:
    _check_model_inputs(images, maps, targets)
    targets = targets.long().to(images.device)
    ranks = _patch_ranks(maps.to(images.device), patch_size)
    total = count_patches(tuple(maps.shape[1:]), patch_size)
    last = total if num_patches is None else min(int(num_patches), total)
    if last < 1:
        raise ValueError(f"num_patches must be at least 1, got {num_patches}")
    counts = torch.arange(last + 1, device=images.device)
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
    fractions = counts.to(scores.dtype) / last
    return PerturbationCurve(counts, fractions, scores, torch.trapezoid(scores, fractions, dim=1))


def deletion_curve(
    model: Model,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    patch_size: int | tuple[int, ...],
    num_patches: int | None = None,
    baseline: float = 0.0,
    chunk_size: int = 64,
) -> PerturbationCurve:
    """Deletion as the SoftCAM reference's ``get_deletion_analysis``; ``area`` is the AUDC (lower is better).

    The image is cut into non-overlapping patches of ``patch_size`` voxels (33 at 512^2 in the
    reference), ranked by the maximum of the map inside them; the top patches are replaced by
    ``baseline`` (0 = the dataset mean after normalisation) one at a time, 0, 1, ..., ``num_patches``
    (default: all of them; the reference stops at 14, ~6 % of the image), and the curve records
    min(p', p) / p of the target class over x = step / ``num_patches`` in [0, 1]. ``chunk_size``
    perturbed images go through the model at once. Compare with the curve of
    ``random_patch_maps``: a model that ignores the deleted patches has a flat curve for any map.
    """
    return _perturbation_curve(model, images, maps, targets, patch_size, num_patches, baseline, chunk_size, insert=False)


def insertion_curve(
    model: Model,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    patch_size: int | tuple[int, ...],
    num_patches: int | None = None,
    baseline: float = 0.0,
    chunk_size: int = 64,
) -> PerturbationCurve:
    """Insertion, the mirror of ``deletion_curve`` (higher is better): start from the ``baseline``
    image and restore the top patches of the original one at a time. The curve is min(p', p) / p,
    the same normalised score as deletion, so both lie in [0, 1] and compare across images of
    different confidence (a plain p' curve would weight confident images more)."""
    return _perturbation_curve(model, images, maps, targets, patch_size, num_patches, baseline, chunk_size, insert=True)


# --- sanity check --------------------------------------------------------------------------------


def parameterised_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the modules holding parameters of their own, in registration order
    (input to output for the bundle's backbones)."""
    return [(name, module) for name, module in model.named_modules() if next(module.parameters(recurse=False), None) is not None]


def layers_from_output(model: nn.Module, features: nn.Module, head: nn.Module, num_layers: int) -> list[str]:
    """Names (in ``model``) of what the sanity check re-initialises: the last ``num_layers``
    parameterised modules of the backbone ``features``, counted from its output, and the explaining
    ``head`` (the head, a sigmoid branch, SoftCAM's class evidence layer). Because the backbone
    layers are counted inside ``features``, every classifier on the same backbone randomises the
    same backbone layers, whatever its head."""
    names = {id(module): name for name, module in model.named_modules()}
    if id(features) not in names or id(head) not in names:
        raise ValueError("features and head must be modules of the model")
    prefix = f"{names[id(features)]}." if names[id(features)] else ""
    backbone = [prefix + name for name, _ in parameterised_modules(features)]
    if not 0 <= num_layers <= len(backbone):
        raise ValueError(f"num_layers must be in 0..{len(backbone)} (parameterised backbone modules), got {num_layers}")
    return backbone[len(backbone) - num_layers :] + [names[id(head)]]


def randomise_modules(model: nn.Module, names: list[str], seed: int | None = None) -> nn.Module:
    """A deep copy of ``model`` whose modules ``names`` (and every parameterised module inside them)
    are re-initialised by their own ``reset_parameters`` (BatchNorm also resets its running
    statistics). The original is left as it is."""
    # Modules may keep tensors of their last forward pass (the SoftCAM head keeps its evidence
    # maps); tensors inside an autograd graph cannot be deep-copied, so the copy holds them detached.
    cached = {id(value): value.detach().clone() for module in model.modules() for value in vars(module).values()
              if isinstance(value, Tensor) and value.grad_fn is not None}
    randomised = copy.deepcopy(model, cached)
    modules = dict(randomised.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ValueError(f"no modules named {unknown} in the model")
    devices = sorted({p.device.index for p in randomised.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for name in names:
            for _, module in parameterised_modules(modules[name]):
                if not hasattr(module, "reset_parameters"):
                    raise TypeError(f"cannot re-initialise {type(module).__name__}: it has no reset_parameters()")
                module.reset_parameters()
    return randomised


def parameter_randomisation_correlation(
    model: nn.Module, explain: Explain, images: Tensor, targets: Tensor, module_names: list[str], seed: int | None = None
) -> Tensor:
    """Spearman correlation (B,) between each image's map from ``model`` and from a copy whose
    modules ``module_names`` are re-initialised (``layers_from_output``). ``explain(model, images,
    targets)`` returns maps (B, *spatial) and may use gradients (it is not wrapped in no_grad). A map
    that follows the model decorrelates; one that ignores it stays at 1."""
    before = explain(model, images, targets).detach()
    after = explain(randomise_modules(model, module_names, seed), images, targets).detach()
    return spearman_correlation(before, after)
