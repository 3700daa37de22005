"""Evidence maps as RGB Secondary Capture images: a picture of the evidence for people in a PACS viewer."""

from __future__ import annotations

import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from bundle.files import atomic_write
from bundle.visualize import blend_evidence, draw_legend
from bundle.writers.base import EvidenceCase, EvidenceWriter, WrittenOutput
from bundle.writers.common import RESEARCH_NOTE, ModelIdentity, copy_body_part, derived_uid, patient_orientation
from bundle.writers.planes import source_images, source_planes

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


class SecondaryCaptureWriter(EvidenceWriter):
    """An RGB Secondary Capture (highdicom) of each written class's evidence over each source image (or
    slice, or frame): ``dicom/secondary_capture/<SOP Instance UID>.dcm``.

    The SC keeps the source's patient and study; its series is new and derived from the source
    series and the model, its SOP Instance UID from the source instance, frame, class and model,
    so writing again gives the same UIDs. It references the source image, names the model in
    DerivationDescription, is marked RESEARCH, and carries no patient-identifying text.
    Sources smaller than ``min_display_side`` are enlarged (nearest neighbour) so the legend stays legible.
    """

    kind = "sc"

    def __init__(self, series_number: int = 9001, folder: str = "dicom/secondary_capture",
                 min_display_side: int = MIN_DISPLAY_SIDE):
        self.series_number = series_number
        self.folder = folder
        self.min_display_side = min_display_side

    def skip_reason(self, case: EvidenceCase) -> str | None:
        return None if case.sources else f"{case.input.kind} inputs have no DICOM source: no Secondary Capture"

    def sop_instance_uid(self, model: ModelIdentity, source: pydicom.Dataset, class_index: int, frame: int = 0) -> str:
        """The SC's SOP Instance UID: derived from the source instance, frame, class and model."""
        return derived_uid(source.SOPInstanceUID, model, f"secondary-capture/{frame}/{class_index}")

    def file_names(self, case: EvidenceCase) -> list[str]:
        return [f"{self.folder}/{self.sop_instance_uid(case.model, ds, k, frame)}.dcm"
                for k in case.classes for ds, frame in source_images(case)]

    def write(self, case: EvidenceCase, output_dir: Path) -> list[WrittenOutput]:
        images = source_images(case)
        display = source_planes(case, case.source_display)  # (n, rows, cols, 3) uint8, as the loader decoded it
        names = iter(self.file_names(case))
        written = []
        for k in case.classes:
            evidence = source_planes(case, case.evidence[k])
            for (source, frame), shown, plane in zip(images, display, evidence):
                sc = self.build(source, shown, plane, k, case.probabilities[k], case.model, case.class_name(k), frame)
                name = next(names)
                with atomic_write(Path(output_dir) / name) as tmp:
                    sc.save_as(tmp, enforce_file_format=True)
                written.append(WrittenOutput(name, k, sc.SOPClassUID, sc.SOPInstanceUID, sc.SeriesInstanceUID))
        return written

    def build(self, source: pydicom.Dataset, display: np.ndarray, evidence: np.ndarray, class_index: int,
              probability: float, model: ModelIdentity, class_name: str, frame: int = 0) -> hd.sc.SCImage:
        """The SC of one source image (or frame): ``display`` (rows, cols, 3) uint8 as a viewer shows the
        source (``bundle.visualize.display_rgb``), ``evidence`` (rows, cols) float of class ``class_index``
        on the same grid. ``source`` is a conformant header (``bundle.writers.conformance``)."""
        rgb = blend_evidence(display, np.asarray(evidence, dtype=np.float32))
        scale = max(1, math.ceil(self.min_display_side / min(rgb.shape[:2])))
        rgb = draw_legend(rgb, [f"{class_name}: p = {probability:.2f}", model.description, RESEARCH_NOTE], scale)
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
            series_instance_uid=derived_uid(source.SeriesInstanceUID, model, "secondary-capture-series"),
            series_number=self.series_number,
            sop_instance_uid=self.sop_instance_uid(model, source, class_index, frame),
            instance_number=int(source.get("InstanceNumber") or 1) * max(1, int(source.get("NumberOfFrames", 1))) + frame,
            manufacturer=model.manufacturer,
            pixel_spacing=tuple(float(s) / scale for s in spacing) if spacing else None,
            # highdicom insists on an orientation for patient images; DICOM allows it empty when unknown
            patient_orientation=orientation or ("L", "F"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=acquisition_equipment(source),
            specific_character_set=source.get("SpecificCharacterSet"),
        )
        if orientation is None:
            sc.PatientOrientation = None
        self._describe(sc, source, model, class_name, frame)
        return sc

    def _describe(self, sc: hd.sc.SCImage, source: pydicom.Dataset, model: ModelIdentity, class_name: str,
                  frame: int) -> None:
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
        sc.DerivationDescription = f"SoftCAM {model.map_title} for '{class_name}'{of_frame} by {model.description}"[:1024]
        sc.SeriesDescription = f"SoftCAM evidence ({RESEARCH_NOTE})"[:64]
        sc.BurnedInAnnotation = "NO"  # the legend names the class and model: nothing identifying
        sc.ContentQualification = "RESEARCH"
        sc.ManufacturerModelName = model.name[:64]
        sc.SoftwareVersions = model.version
        copy_body_part(source, sc)
