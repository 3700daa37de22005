"""Loading DICOM with MONAI's PydicomReader, and the DICOM-specific intensity conventions."""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping

import pydicom
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader, PydicomReader
from monai.transforms import MapTransform
from monai.utils import MetaKeys

_TAG_KEY = re.compile(r"^[0-9A-Fa-f]{8}$")
COLOUR_INTERPRETATIONS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")


def _first_value(ds: pydicom.Dataset, keyword: str) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return math.nan
    return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)


def image_description(ds: pydicom.Dataset) -> dict:
    """The few non-identifying facts about a DICOM image that preprocessing needs.

    Flat scalars of fixed type (NaN / "" when absent) so that MONAI's collate can batch them.
    """
    return {
        "modality": str(ds.get("Modality", "")),
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")),
        "samples_per_pixel": int(ds.get("SamplesPerPixel", 1)),
        "window_center": _first_value(ds, "WindowCenter"),
        "window_width": _first_value(ds, "WindowWidth"),
    }


class DicomReader(PydicomReader):
    """MONAI's PydicomReader (rescale slope/intercept applied, series folders stacked) with two changes.

    - A series folder contributes only its DICOM files (MONAI's default pattern takes every file).
    - The metadata keeps no DICOM tag: patient and study identifiers never enter the pipeline, its
      logs or its batches. The tags preprocessing needs come as the flat fields of
      ``image_description``; colour images are marked channel-last for ``EnsureChannelFirstd``.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("fname_regex", None)  # None: filter folder contents with pydicom.misc.is_dicom
        super().__init__(**kwargs)

    def get_data(self, img) -> tuple:
        first = img
        while isinstance(first, (list, tuple)):
            first = first[0]
        array, meta = super().get_data(img)
        meta = {k: v for k, v in meta.items() if not (isinstance(k, str) and _TAG_KEY.match(k))}
        meta.update(image_description(first))
        if meta["samples_per_pixel"] > 1:
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = -1
        return array, meta


def medical_image_readers() -> list:
    """Readers for ``LoadImaged``: DICOM files and series folders first, then NIfTI (and what nibabel reads)."""
    # LoadImage tries user-given readers last to first and moves on when one fails.
    return [NibabelReader(), DicomReader()]


class InvertMonochrome1d(MapTransform):
    """Make MONOCHROME1 images (higher value = darker) read like MONOCHROME2 by negating them.

    Negation keeps every intensity difference; the DICOM window centre is negated with it, so a
    later ``WindowIntensityd`` shows the image as the modality intended. Other images pass through.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, MetaTensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.meta.get("photometric_interpretation") != "MONOCHROME1":
                continue
            inverted = -img
            inverted.meta["photometric_interpretation"] = "MONOCHROME2"
            inverted.meta["window_center"] = -img.meta.get("window_center", math.nan)
            d[key] = inverted
        return d
