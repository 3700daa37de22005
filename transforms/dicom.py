"""Loading DICOM with MONAI's PydicomReader, and the DICOM-specific intensity conventions."""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping

import highdicom as hd
import numpy as np
import pydicom
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader, PydicomReader
from monai.data.utils import affine_to_spacing
from monai.transforms import MapTransform
from monai.utils import MetaKeys, SpaceKeys

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


# (slice, row, column) array indices -> (column, row, slice), the axis order MONAI gives a series
_SLICE_ROW_COLUMN_TO_MONAI = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_enhanced_volume(ds: pydicom.Dataset) -> bool:
    """A multi-frame image whose frames carry their own plane positions (enhanced and legacy-converted
    enhanced CT, MR, PET, ...): a volume in one file."""
    return int(ds.get("NumberOfFrames", 1) or 1) > 1 and "PerFrameFunctionalGroupsSequence" in ds


def enhanced_volume(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The volume of an enhanced multi-frame image as MONAI lays out a series: array (cols, rows, slices),
    float32 with the per-frame modality transforms applied, and its RAS affine.

    MONAI's PydicomReader reads such a file as a stack of frames without its geometry (identity affine,
    axes in frame order); highdicom sorts the frames by position and derives the affine from the
    functional groups, so this only reorders its axes and turns LPS into RAS.
    """
    volume = hd.Image.from_dataset(ds, copy=False).get_volume(dtype=np.float32, apply_modality_transform=True)
    array = np.ascontiguousarray(volume.array.transpose(2, 1, 0))
    return array, _LPS_TO_RAS @ volume.affine @ _SLICE_ROW_COLUMN_TO_MONAI


def frame_slices(ds: pydicom.Dataset, affine: np.ndarray) -> list[int]:
    """Index, along the last axis of a volume with RAS ``affine`` (cols, rows, slices), of each frame of
    the enhanced multi-frame image ``ds`` (in frame order): where its plane position falls."""
    to_index = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    shared = ds.get("SharedFunctionalGroupsSequence", [pydicom.Dataset()])[0]
    slices = []
    for frame in ds.PerFrameFunctionalGroupsSequence:
        plane = frame.get("PlanePositionSequence") or shared.get("PlanePositionSequence")
        lps = np.array([float(v) for v in plane[0].ImagePositionPatient] + [1.0])
        slices.append(int(round((to_index @ (_LPS_TO_RAS @ lps))[2])))
    return slices


class DicomReader(PydicomReader):
    """MONAI's PydicomReader (rescale slope/intercept applied, series folders stacked) with three changes.

    - A series folder contributes only its DICOM files (MONAI's default pattern takes every file).
    - An enhanced multi-frame volume gets its geometry (``enhanced_volume``), as a series would.
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
        if isinstance(img, pydicom.Dataset) and is_enhanced_volume(img):
            array, affine = enhanced_volume(img)
            meta = {MetaKeys.AFFINE: affine, MetaKeys.ORIGINAL_AFFINE: affine.copy(), MetaKeys.SPATIAL_SHAPE: array.shape,
                    MetaKeys.SPACE: SpaceKeys.RAS, MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
                    "spacing": affine_to_spacing(affine, r=3)}
        else:
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
