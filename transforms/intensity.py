"""Intensity windowing to [0, 1]."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform


def window_bounds(values: np.ndarray, center: float = math.nan, width: float = math.nan,
                  percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
    """(lower, upper) intensity of a display window: ``center`` +- ``width``/2 when both are finite
    and the width positive, otherwise the ``percentiles`` of ``values``."""
    if math.isfinite(center) and math.isfinite(width) and width > 0:
        return center - width / 2, center + width / 2
    flat = np.asarray(values, dtype=np.float32).ravel()
    flat = flat[:: max(1, flat.size // 1_000_000)]  # a subsample is plenty for percentiles
    lower, upper = np.percentile(flat, percentiles)
    return float(lower), float(upper)


class WindowIntensityd(MapTransform):
    """Map intensities into [0, 1] through a window, clipping outside it.

    The window is, in order of preference: ``window=(center, width)`` when given (a CT window in
    HU, say); the image's own DICOM VOI window when ``use_dicom_window`` and it has one; otherwise
    the ``percentiles`` of the image's intensities (robust for X-ray and NIfTI without a window).
    Colour images are windowed on all channels together.
    """

    def __init__(
        self,
        keys: KeysCollection,
        window: tuple[float, float] | None = None,
        percentiles: tuple[float, float] = (0.5, 99.5),
        use_dicom_window: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if window is not None and window[1] <= 0:
            raise ValueError(f"window width must be > 0, got {window}")
        self.window = window
        self.percentiles = percentiles
        self.use_dicom_window = use_dicom_window

    def bounds(self, img: torch.Tensor) -> tuple[float, float]:
        meta = getattr(img, "meta", {})
        center, width = self.window if self.window is not None else (math.nan, math.nan)
        if self.window is None and self.use_dicom_window:
            center, width = float(meta.get("window_center", math.nan)), float(meta.get("window_width", math.nan))
        return window_bounds(img.detach().cpu().numpy(), center, width, self.percentiles)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            lower, upper = self.bounds(img)
            scale = upper - lower if upper > lower else 1.0
            d[key] = ((img.float() - lower) / scale).clamp(0.0, 1.0)
        return d
