"""Rendering evidence maps over their images for people to look at."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: training runs on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402


def upsample(maps: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Maps (B, C, h, w[, d]) to the input size, (bi/tri)linear, as float32."""
    mode = "bilinear" if maps.ndim == 4 else "trilinear"
    return F.interpolate(maps.float(), size=size, mode=mode, align_corners=False)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Scale each map of (B, ...) to [0, 1]; a constant map becomes 0 (not 1, unlike some viewers)."""
    flat = x.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(x)


def display_plane(image: np.ndarray, heat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2D arrays (rows, cols) to show: 3D volumes at the slice of the map's maximum (last axis)."""
    if image.ndim == 3:
        k = int(np.unravel_index(np.argmax(heat), heat.shape)[-1])
        image, heat = image[..., k], heat[..., k]
    return image.T, heat.T  # MONAI arrays are (x, y): transpose to (rows, cols)


def save_evidence_gallery(
    path: Path,
    images: torch.Tensor,
    maps: torch.Tensor,
    labels: torch.Tensor,
    probabilities: torch.Tensor,
    title: str = "",
    alpha: float = 0.5,
) -> Path:
    """Write a PNG: each image (B, 1, H, W[, D]) in [0, 1] above the same image with the evidence
    map of its predicted class (maps (B, C, h, w[, d]) upsampled, min-max scaled, jet, ``alpha``).

    Titles carry only the true label, predicted class and its probability: no identifiers.
    """
    predicted = probabilities.argmax(1)
    heat = minmax(upsample(maps[torch.arange(len(maps)), predicted].unsqueeze(1), tuple(images.shape[2:])))
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for i in range(n):
        img, h = display_plane(images[i, 0].float().cpu().numpy(), heat[i, 0].cpu().numpy())
        axes[0, i].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[1, i].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[1, i].imshow(h, cmap="jet", alpha=alpha, vmin=0, vmax=1)
        axes[0, i].set_title(f"label {int(labels[i])}", fontsize=8)
        axes[1, i].set_title(f"pred {int(predicted[i])} p={float(probabilities[i, predicted[i]]):.2f}", fontsize=8)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
