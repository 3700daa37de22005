"""Evidence maps as RGB Secondary Capture images: a picture of the evidence for people in a PACS viewer."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from pydicom.pixels import apply_modality_lut
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from bundle.writers.common import (
    RESEARCH_NOTE,
    ModelIdentity,
    atomic_write,
    copy_body_part,
    derived_uid,
    patient_orientation,
)
from transforms.dicom import COLOUR_INTERPRETATIONS, image_description
from transforms.intensity import window_bounds

MIN_DISPLAY_SIDE = 256  # smaller sources are enlarged (nearest neighbour) so the legend stays legible
SOURCE_IMAGE_PURPOSE = codes.DCM.SourceImageForImageProcessingOperation  # DCM 121322
# SCImage arguments taken from the source, so the SC files under the source's patient and study
PATIENT_AND_STUDY = {
    "patient_id": "PatientID", "patient_name": "PatientName", "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex", "accession_number": "AccessionNumber", "study_id": "StudyID",
    "study_date": "StudyDate", "study_time": "StudyTime", "referring_physician_name": "ReferringPhysicianName",
}
EQUIPMENT = {  # ContributingEquipment arguments describing the source's acquisition equipment
    "manufacturer_model_name": "ManufacturerModelName", "software_versions": "SoftwareVersions",
    "device_serial_number": "DeviceSerialNumber", "institution_name": "InstitutionName",
    "institutional_department_name": "InstitutionalDepartmentName", "institution_address": "InstitutionAddress",
    "station_name": "StationName",
}
# matplotlib's jet table (256 RGB rows), looked up once: ``colormaps[...]`` copies and rebuilds it per call
JET = colormaps["jet"](np.arange(colormaps["jet"].N))[:, :3]
# Storage SOP classes whose instances are multi-frame by definition (PS3.4 Annex B): only these may be
# referenced with ReferencedFrameNumber. Enhanced CT/MR/XA/US, multi-frame SC, US, XA, RF, NM, DBT, PET.
MULTI_FRAME_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2", "1.2.840.10008.5.1.4.1.1.4.1",
    "1.2.840.10008.5.1.4.1.1.4.3", "1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.5.1.4.1.1.6.2",
    "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2", "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4", "1.2.840.10008.5.1.4.1.1.12.1", "1.2.840.10008.5.1.4.1.1.12.1.1",
    "1.2.840.10008.5.1.4.1.1.12.2", "1.2.840.10008.5.1.4.1.1.12.2.1", "1.2.840.10008.5.1.4.1.1.13.1.3",
    "1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.130",
})


def acquisition_equipment(source: pydicom.Dataset) -> list[hd.ContributingEquipment]:
    """The source's acquisition equipment as a Contributing Equipment item (none when its Manufacturer is
    empty), as ``hd.ContributingEquipment.for_image_acquisition`` makes it for an image. That classmethod
    first checks that the source's IOD has pixel data by scanning the standard's tables (~5 ms a call);
    our sources are images whose pixels were just decoded, so the item is built directly."""
    if not source.get("Manufacturer"):
        return []
    return [hd.ContributingEquipment(
        manufacturer=source.Manufacturer,
        purpose_of_reference=codes.DCM.AcquisitionEquipment,
        contribution_datetime=source.get("AcquisitionDateTime") or None,
        contribution_description="Acquisition equipment of the source image(s)",
        **{attribute: source.get(keyword) or None for attribute, keyword in EQUIPMENT.items()},
    )]


def source_frame(ds: pydicom.Dataset, frame: int = 0) -> np.ndarray:
    """One frame of a source image for display: (rows, cols, 3) float in [0, 1].

    Greyscale: modality LUT, then the file's VOI window (or the 0.5-99.5 percentiles), MONOCHROME1
    inverted. Colour: as decoded (pydicom converts YBR to RGB), scaled by the stored bit depth.
    """
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1)) > 1:
        pixels = pixels[frame]
    info = image_description(ds)
    if info["photometric_interpretation"] in COLOUR_INTERPRETATIONS or info["samples_per_pixel"] == 3:
        return np.clip(pixels.astype(np.float32) / (2 ** int(ds.BitsStored) - 1), 0, 1)
    values = apply_modality_lut(pixels, ds).astype(np.float32)
    lower, upper = window_bounds(values, info["window_center"], info["window_width"])
    grey = np.clip((values - lower) / max(upper - lower, 1e-6), 0, 1)
    if info["photometric_interpretation"] == "MONOCHROME1":
        grey = 1.0 - grey
    return np.repeat(grey[..., None], 3, axis=-1)


def blend_evidence(display: np.ndarray, evidence: np.ndarray, max_alpha: float = 0.6) -> np.ndarray:
    """Jet-coloured evidence over a display image, both (rows, cols[, 3]) on the same grid.

    The map is min-max scaled; its opacity grows with the evidence (up to ``max_alpha``), so
    regions without evidence show the image unchanged. Returns uint8 (rows, cols, 3).
    """
    if evidence.shape != display.shape[:2]:
        raise ValueError(f"evidence map {evidence.shape} is not on the image grid {display.shape[:2]}")
    span = float(evidence.max() - evidence.min())
    heat = (evidence - evidence.min()) / span if span > 0 else np.zeros_like(evidence, dtype=np.float32)
    colour = jet(heat)
    alpha = max_alpha * heat[..., None]
    return np.round(255 * ((1 - alpha) * display + alpha * colour)).astype(np.uint8)


def jet(heat: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] of values in [0, 1], as ``colormaps["jet"](heat)[..., :3]`` (same table, same indexing)."""
    return JET[np.clip((heat * len(JET)).astype(np.intp), 0, len(JET) - 1)]


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # loading it per image costs more than drawing


def draw_legend(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """Append a black band under the image with the given text lines and a jet colour bar."""
    width = rgb.shape[1]
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
    return np.concatenate([rgb, np.asarray(band)], axis=0)


class SecondaryCaptureWriter:
    """Write the evidence map of one source image as an RGB Secondary Capture (highdicom).

    The SC keeps the source's patient and study; its series is new and derived from the source
    series and the model, its SOP Instance UID from the source instance, frame, class and model,
    so writing again gives the same UIDs. It references the source image, names the model in
    DerivationDescription, is marked RESEARCH, and carries no patient-identifying text.
    """

    def __init__(self, model: ModelIdentity, class_names: dict[int, str] | None = None, series_number: int = 9001):
        self.model = model
        self.class_names = class_names or {}
        self.series_number = series_number

    def sop_instance_uid(self, source: pydicom.Dataset, predicted_class: int, frame: int = 0) -> str:
        """The SC's SOP Instance UID: derived from the source instance, frame, class and model."""
        return derived_uid(source.SOPInstanceUID, self.model, f"secondary-capture/{frame}/{predicted_class}")

    def build(self, source: pydicom.Dataset, evidence: np.ndarray, predicted_class: int, probability: float,
              frame: int = 0) -> hd.sc.SCImage:
        """``evidence``: (rows, cols) float map of ``predicted_class`` on the source frame's pixel grid."""
        display = source_frame(source, frame)
        rgb = blend_evidence(display, np.asarray(evidence, dtype=np.float32))
        scale = max(1, math.ceil(MIN_DISPLAY_SIDE / min(rgb.shape[:2])))
        if scale > 1:
            rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
        name = self.class_names.get(predicted_class, f"class {predicted_class}")
        rgb = draw_legend(rgb, [f"{name}: p = {probability:.2f}", self.model.description, RESEARCH_NOTE])
        spacing = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
        orientation = patient_orientation(source)
        # highdicom's SCImage.from_ref_dataset does what follows and also derives the acquisition equipment
        # with a check that rescans the standard's IOD tables for pixel data, a third of this writer's time
        sc = hd.sc.SCImage(
            pixel_array=rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            study_instance_uid=source.StudyInstanceUID,
            **{attribute: source.get(keyword) for attribute, keyword in PATIENT_AND_STUDY.items()},
            series_instance_uid=derived_uid(source.SeriesInstanceUID, self.model, "secondary-capture-series"),
            series_number=self.series_number,
            sop_instance_uid=self.sop_instance_uid(source, predicted_class, frame),
            instance_number=int(source.get("InstanceNumber") or 1) * max(1, int(source.get("NumberOfFrames", 1))) + frame,
            manufacturer=self.model.manufacturer,
            pixel_spacing=tuple(float(s) / scale for s in spacing) if spacing else None,
            # highdicom insists on an orientation for patient images; DICOM allows it empty when unknown
            patient_orientation=orientation or ("L", "F"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=acquisition_equipment(source),
            specific_character_set=source.get("SpecificCharacterSet"),
        )
        if orientation is None:
            sc.PatientOrientation = None
        self._describe(sc, source, name, frame)
        return sc

    def _describe(self, sc: hd.sc.SCImage, source: pydicom.Dataset, class_name: str, frame: int) -> None:
        reference = pydicom.Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        multi_frame = int(source.get("NumberOfFrames", 1)) > 1
        if multi_frame and source.SOPClassUID in MULTI_FRAME_SOP_CLASSES:
            reference.ReferencedFrameNumber = frame + 1  # only multi-frame SOP classes may be referenced by frame
        purpose = pydicom.Dataset()
        purpose.CodeValue, purpose.CodingSchemeDesignator = SOURCE_IMAGE_PURPOSE.value, SOURCE_IMAGE_PURPOSE.scheme_designator
        purpose.CodeMeaning = SOURCE_IMAGE_PURPOSE.meaning
        reference.PurposeOfReferenceCodeSequence = [purpose]
        sc.SourceImageSequence = [reference]
        of_frame = f" of frame {frame + 1}" if multi_frame else ""
        sc.DerivationDescription = f"SoftCAM class evidence map for '{class_name}'{of_frame} by {self.model.description}"[:1024]
        sc.SeriesDescription = f"SoftCAM evidence ({RESEARCH_NOTE})"[:64]
        sc.BurnedInAnnotation = "NO"  # the legend names the class and model: nothing identifying
        sc.ContentQualification = "RESEARCH"
        sc.ManufacturerModelName = self.model.name[:64]
        sc.SoftwareVersions = self.model.version
        copy_body_part(source, sc)

    def write(self, path: Path, source: pydicom.Dataset, evidence: np.ndarray, predicted_class: int,
              probability: float, frame: int = 0) -> Path:
        """Build the SC and write it to ``path`` atomically (temporary name, then rename)."""
        sc = self.build(source, evidence, predicted_class, probability, frame)
        with atomic_write(Path(path)) as tmp:
            sc.save_as(tmp, enforce_file_format=True)
        return Path(path)
