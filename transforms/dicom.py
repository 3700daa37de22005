"""Loading DICOM with MONAI's PydicomReader, and the DICOM-specific intensity conventions."""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, PydicomReader
from monai.data.utils import affine_to_spacing
from monai.transforms import MapTransform
from monai.utils import MetaKeys, SpaceKeys
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

_TAG_KEY = re.compile(r"^[0-9A-Fa-f]{8}$")
COLOUR_INTERPRETATIONS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# (implicit VR, little endian) as pydicom detected them -> the transfer syntax of a file without file meta
_ENCODING_SYNTAX = {(True, True): ImplicitVRLittleEndian, (False, True): ExplicitVRLittleEndian,
                    (False, False): ExplicitVRBigEndian}


def read_dicom(path: str | Path, **kwargs) -> pydicom.Dataset:
    """``pydicom.dcmread(path, **kwargs)``, also for files without the 128-byte preamble and "DICM" prefix.

    Older files (ACR-NEMA style, some modality exports) start straight with the dataset; pydicom reads
    them with ``force=True``, which would also "read" any other file as garbage. So the forced read is
    accepted only when it yields an image (pixel data, rows, columns); otherwise the original
    ``InvalidDicomError`` is raised. A dataset without file meta gets the transfer syntax pydicom
    detected while reading it, so that its pixels can be decoded.
    """
    try:
        return pydicom.dcmread(path, **kwargs)
    except InvalidDicomError as err:
        try:
            ds = pydicom.dcmread(path, force=True, **kwargs)
        except Exception:  # not a dataset at all: the original reason is the clearer one
            raise err from None
        if not any(k in ds for k in PIXEL_KEYWORDS) or "Rows" not in ds or "Columns" not in ds:
            raise err from None
        if "TransferSyntaxUID" not in ds.file_meta:
            ds.file_meta.TransferSyntaxUID = _ENCODING_SYNTAX[tuple(ds.original_encoding)]
        return ds


def model_values(ds: pydicom.Dataset, pixels: np.ndarray) -> np.ndarray:
    """Decoded pixels of ``ds`` (one frame or all: (..., rows, cols[, samples])) as the model sees them,
    float32: greyscale through the modality LUT (Hounsfield units for CT), PALETTE COLOR through its
    lookup tables to RGB (..., 3), other colour as decoded (pydicom turns YBR into RGB)."""
    interpretation = str(ds.get("PhotometricInterpretation", ""))
    if interpretation == "PALETTE COLOR":
        return apply_color_lut(pixels, ds).astype(np.float32)
    if int(ds.get("SamplesPerPixel", 1)) == 1:
        return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    return pixels.astype(np.float32)


def _first_value(ds: pydicom.Dataset, keyword: str) -> float:
    """The first value of a numeric attribute, NaN when absent or not a number (some sources write junk)."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return math.nan
        return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)
    except (TypeError, ValueError, IndexError):
        return math.nan


def image_description(ds: pydicom.Dataset) -> dict:
    """The few non-identifying facts about a DICOM image that preprocessing and display need.

    Flat scalars of fixed type (NaN / "" when absent) so that MONAI's collate can batch them.
    ``samples_per_pixel`` and ``bits_stored`` describe the image as ``model_values`` returns it: a
    PALETTE COLOR image has three samples of its lookup tables' depth.
    """
    interpretation = str(ds.get("PhotometricInterpretation", ""))
    palette = interpretation == "PALETTE COLOR"
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2]) if palette and "RedPaletteColorLookupTableDescriptor" in ds \
        else int(ds.get("BitsStored", 8) or 8)
    return {
        "modality": str(ds.get("Modality", "")),
        "photometric_interpretation": interpretation,
        "samples_per_pixel": 3 if palette else int(ds.get("SamplesPerPixel", 1)),
        "bits_stored": bits,
        "window_center": _first_value(ds, "WindowCenter"),
        "window_width": _first_value(ds, "WindowWidth"),
    }


def dicom_frame(path: str | Path, frame: int, header: pydicom.Dataset | None = None) -> tuple[MetaTensor, pydicom.Dataset]:
    """Frame ``frame`` (0-based) of a multi-frame DICOM file, decoded alone (pydicom's frame-level
    decoding reads only that frame's bytes), shaped as ``DicomReader`` shapes a single-frame image:
    (cols, rows[, 3]) float32 of ``model_values`` with the same flat metadata. Also returns the file's
    header (its pixel data left on disk): pass it back for the next frame of the same file."""
    header = header if header is not None else read_dicom(path, defer_size="1 KB")
    syntax = header.file_meta.TransferSyntaxUID
    if syntax.is_deflated:  # frame-level reading from the file needs a plain stream: decode from the inflated dataset
        pixels = pixel_array(read_dicom(path), index=frame)
    else:
        pixels = pixel_array(path, index=frame, transfer_syntax_uid=syntax)
    array = np.swapaxes(model_values(header, pixels), 0, 1)
    info = image_description(header)
    channel_dim = -1 if array.ndim == 3 else float("nan")
    meta = {**info, "filename_or_obj": f"{path}#frame{frame + 1}", MetaKeys.ORIGINAL_CHANNEL_DIM: channel_dim}
    return MetaTensor(torch.as_tensor(array), meta=meta), header  # channel-last like the reader


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
    """MONAI's PydicomReader (series folders stacked in InstanceNumber order) with these changes.

    - Files are read with ``read_dicom``: files without a preamble are read too. A series folder
      contributes only the files that are DICOM images (MONAI's default pattern takes every file).
    - Pixels are ``model_values``: the whole modality LUT, PALETTE COLOR as RGB.
    - A multi-frame image that is not an enhanced volume (ultrasound, NM, multi-frame SC) is laid out
      (cols, rows, frames[, samples]) like a series, not with its frames as the first axis.
    - An enhanced multi-frame volume gets its geometry (``enhanced_volume``), as a series would.
    - A PixelSpacing with a zero or negative value is ignored (MONAI then assumes 1 mm), rather than
      giving a singular affine.
    - The metadata keeps no DICOM tag: patient and study identifiers never enter the pipeline, its
      logs or its batches. The tags preprocessing needs come as the flat fields of
      ``image_description``; colour images are marked channel-last for ``EnsureChannelFirstd``.
    """

    def read(self, data, **kwargs):
        names = [str(n) for n in (data if isinstance(data, (list, tuple)) else [data])]
        options = {**self.kwargs, **kwargs}
        images, self.filenames, self.has_series = [], [], False
        for name in names:
            if Path(name).is_dir():
                slices, files = [], []
                for path in sorted(p for p in Path(name).iterdir() if p.is_file()):
                    try:
                        ds = read_dicom(path, **options)
                    except Exception:  # not DICOM: a README, a checksum file, ...
                        continue
                    if any(k in ds for k in PIXEL_KEYWORDS):  # not a DICOMDIR, report or other non-image
                        slices.append(ds)
                        files.append(str(path))
                if not slices:
                    raise ValueError(f"{name}: folder holds no DICOM image")
                self.has_series = self.has_series or len(slices) > 1
                images.append(slices if len(slices) > 1 else slices[0])
                self.filenames.append(files if len(slices) > 1 else files[0])
            else:
                images.append(read_dicom(name, **options))
                self.filenames.append(name)
        return images[0] if len(names) == 1 else images

    def _get_array_data(self, img, filename):
        values = model_values(img, img.pixel_array)
        if int(img.get("NumberOfFrames", 1) or 1) > 1:
            values = np.moveaxis(values, 0, 2)  # frames last: MONAI's swap of the first two axes gives (cols, rows, frames)
        return values

    def _get_meta_dict(self, img) -> dict:
        meta = super()._get_meta_dict(img)
        spacing = meta.get("00280030", {}).get("Value")
        if spacing is not None and not all(math.isfinite(float(v)) and float(v) > 0 for v in spacing):
            del meta["00280030"]
        return meta

    def _get_affine(self, metadata: dict, lps_to_ras: bool = True):
        if "00200037" not in metadata or "00200032" not in metadata:
            # projection, ultrasound and photographic images have no patient plane: their pixel grid is the
            # only space, so the identity MONAI falls back to is right, not worth its warning for every file
            return np.eye(4)
        return super()._get_affine(metadata, lps_to_ras)

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
