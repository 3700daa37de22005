"""Rendering evidence maps over their images for people to look at: the one place colours, windows
and legends are drawn (training galleries, the PNG overlays and the Secondary Captures)."""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: training runs on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from transforms.intensity import window_bounds  # noqa: E402

# matplotlib's jet table (256 RGB rows), looked up once: ``colormaps[...]`` copies and rebuilds it per call
JET = colormaps["jet"](np.arange(colormaps["jet"].N))[:, :3]


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


def jet(heat: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] of values in [0, 1], as ``colormaps["jet"](heat)[..., :3]`` (same table, same indexing)."""
    return JET[np.clip((heat * len(JET)).astype(np.intp), 0, len(JET) - 1)]


def blend_evidence(display: np.ndarray, evidence: np.ndarray, max_alpha: float = 0.6) -> np.ndarray:
    """Jet-coloured evidence over a display image: ``display`` (rows, cols, 3) RGB, float in [0, 1] or
    uint8, and ``evidence`` (rows, cols) on the same grid.

    The map is min-max scaled; its opacity grows with the evidence (up to ``max_alpha``), so
    regions without evidence show the image unchanged. Returns uint8 (rows, cols, 3).
    """
    if display.ndim != 3 or display.shape[-1] != 3 or evidence.shape != display.shape[:2]:
        raise ValueError(f"evidence map {evidence.shape} is not on the RGB image grid {display.shape}")
    if display.dtype == np.uint8:
        display = display.astype(np.float32) / 255
    span = float(evidence.max() - evidence.min())
    heat = (evidence - evidence.min()) / span if span > 0 else np.zeros_like(evidence, dtype=np.float32)
    alpha = max_alpha * heat[..., None]
    return np.round(255 * ((1 - alpha) * display + alpha * jet(heat))).astype(np.uint8)


def display_rgb(values: np.ndarray, description: dict) -> np.ndarray:
    """A DICOM image as the loader decoded it (``transforms.dicom.model_values``, laid out (X, Y[, Z][, 3]))
    -> uint8 RGB (X, Y[, Z], 3) as a viewer shows it.

    ``description`` is ``transforms.dicom.image_description`` of the source. Greyscale: its VOI window,
    else the 0.5-99.5 percentiles of each plane (X, Y); MONOCHROME1 inverted. Colour (RGB, YBR as
    RGB, palette colour as RGB): scaled by its bit depth.
    """
    values = np.asarray(values, dtype=np.float32)
    if int(description["samples_per_pixel"]) == 3:
        top = float(2 ** int(description.get("bits_stored", 8)) - 1)
        return np.round(np.clip(values / top, 0, 1) * 255).astype(np.uint8)
    planes = values[..., None] if values.ndim == 2 else values
    grey = np.empty(planes.shape, np.float32)
    for z in range(planes.shape[-1]):
        lower, upper = window_bounds(planes[..., z], description["window_center"], description["window_width"])
        grey[..., z] = np.clip((planes[..., z] - lower) / max(upper - lower, 1e-6), 0, 1)
    if description["photometric_interpretation"] == "MONOCHROME1":
        grey = 1.0 - grey
    grey = np.round(255 * grey).astype(np.uint8).reshape(values.shape)
    return np.repeat(grey[..., None], 3, axis=-1)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # loading it per image costs more than drawing


# A run draws the same few legends over and over (the text is class, probability to 2 decimals, model and a
# fixed note; the width is the image's): each band is drawn once, kept read-only, and copied under its images.
@functools.lru_cache(maxsize=512)
def legend_band(width: int, lines: tuple[str, ...]) -> np.ndarray:
    """A black band (rows, ``width``, 3) uint8 with the text ``lines`` and a jet colour bar under them."""
    font_size = max(10, width // 40)
    font = _font(font_size)
    band = Image.new("RGB", (width, (font_size + 4) * len(lines) + font_size + 10), "black")
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * (font_size + 4)), line, fill="white", font=font)
    bar = (jet(np.linspace(0, 1, width // 3)) * 255).astype(np.uint8)
    y = 4 + len(lines) * (font_size + 4)
    band.paste(Image.fromarray(np.repeat(bar[None], font_size // 2 + 2, axis=0)), (4, y))
    draw.text((8 + width // 3, y - 2), "less -> more evidence", fill="white", font=font)
    pixels = np.asarray(band).copy()
    pixels.flags.writeable = False
    return pixels


def draw_legend(rgb: np.ndarray, lines: list[str], scale: int = 1) -> np.ndarray:
    """The image (rows, cols, 3) uint8 enlarged ``scale`` times (nearest neighbour), with a black band under it
    holding the text lines and a jet colour bar (``legend_band``): (rows * scale + band rows, cols * scale, 3)."""
    rows, cols = rgb.shape[:2]
    band = legend_band(cols * scale, tuple(lines))
    out = np.empty((rows * scale + len(band), cols * scale, 3), np.uint8)
    # one copy into place, each pixel repeated over a scale x scale block
    out[: rows * scale].reshape(rows, scale, cols, scale, 3)[...] = rgb[:, None, :, None, :]
    out[rows * scale :] = band
    return out
