"""The result of each input as a DICOM Comprehensive 3D SR (TID 1500 Measurement Report), for software to read.

The IHE AI Results profile carries an algorithm's qualitative findings as a TID 1500 report; OHIF reads
them. One report per input (image, frame of a multi-frame image, or series), built with highdicom:

- Observation context: the algorithm as the observing device (name, manufacturer, model).
- Procedure reported: the imaging procedure of the source's modality (SNOMED CT).
- Image library: the source images (not for an enhanced multi-frame volume, whose plane attributes
  highdicom cannot describe an entry from).
- Evidence: the source instances and the Secondary Capture and Parametric Map outputs of the same input (the
  writers listed before this one in ``writers``, found in ``case.written``), in the Current Requested
  Procedure Evidence Sequence (the SR's references to the instances of its study). They are not image library
  entries: TID 1600 lists images the measurements were made on, and highdicom's library takes no Parametric Map.
- One image-level measurement group (TID 1501) with a tracking identifier, the algorithm (name, version and
  the weights' digest as a parameter), the source images (Source of Measurement), the finding (TID 1501's
  Finding row, DCM 121071 = the predicted class, which highdicom reads back as the group's finding type)
  and each class's probability as a measurement (unit "1", UCUM).

Codes: DCM and SNOMED CT where a concept exists; the classes (unless ``class_codes`` maps them to standard
codes) and the per-class probabilities use the private coding scheme ``99SOFTCAM`` (``CLASS<k>`` for class k,
``PROB<k>`` for its probability), declared in the report's Coding Scheme Identification Sequence.
Patient and study are the source's (its conformant copy, ``bundle.writers.conformance``); the series and
instance UIDs derive from the sources and the model, as the other outputs'. The report is COMPLETE,
UNVERIFIED and PRELIMINARY (no person has verified it) and its series says research use only.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from bundle.files import atomic_write
from bundle.writers.base import EvidenceCase, EvidenceWriter, WrittenOutput
from bundle.writers.common import RESEARCH_NOTE, ModelIdentity, derived_uid
from bundle.writers.secondary_capture import MULTI_FRAME_SOP_CLASSES
from transforms.dicom import is_enhanced_volume

PRIVATE_SCHEME = "99SOFTCAM"
# Procedure reported (TID 1500 requires one): SNOMED CT imaging procedures by source modality
PROCEDURES = {
    "CT": codes.SCT.ComputedTomography,
    "MR": Code("113091000", "SCT", "Magnetic resonance imaging"),
    "CR": Code("168537006", "SCT", "Plain radiography"),
    "DX": Code("168537006", "SCT", "Plain radiography"),
}
IMAGING_PROCEDURE = codes.SCT.ImagingProcedure
# Type 2 attributes highdicom copies from the first evidence dataset by attribute access: an absent one is
# passed on empty, as the standard allows, instead of failing the report
PATIENT_AND_STUDY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                     "StudyDate", "StudyTime")


def class_code(k: int, name: str) -> Code:
    """Class ``k`` (named ``name``) as a code of the private scheme."""
    return Code(f"CLASS{k}", PRIVATE_SCHEME, name[:64])


def probability_code(k: int, name: str) -> Code:
    """The concept "probability of class k" as a code of the private scheme (DCM has it for cancer only)."""
    return Code(f"PROB{k}", PRIVATE_SCHEME, f"Probability of {name}"[:64])


class StructuredReportWriter(EvidenceWriter):
    """A Comprehensive 3D SR per input: ``dicom/structured_report/<SOP Instance UID>.dcm`` (see the module's doc).

    ``class_codes``: standard codes for classes, by class name: name -> [code value, coding scheme designator,
    meaning] (e.g. ``{"lesion": ["52988006", "SCT", "Lesion"]}``); other classes get private codes. List it after the
    Secondary Capture and Parametric Map writers, so the report references their outputs.
    """

    kind = "sr"

    def __init__(self, series_number: int = 9003, folder: str = "dicom/structured_report",
                 class_codes: dict | None = None):
        self.series_number = series_number
        self.folder = folder
        self.class_codes = {str(k): tuple(v) for k, v in (class_codes or {}).items()}

    def skip_reason(self, case: EvidenceCase) -> str | None:
        return None if case.sources else f"{case.input.kind} inputs have no DICOM source: no Structured Report"

    def sop_instance_uid(self, model: ModelIdentity, case: EvidenceCase) -> str:
        """Derived from every source instance (and the frame, for one frame of a multi-frame image) and the model."""
        frame = "" if case.input.frame is None else f"/{case.input.frame}"
        return derived_uid("/".join(ds.SOPInstanceUID for ds in case.sources) + frame, model, "structured-report")

    def file_names(self, case: EvidenceCase) -> list[str]:
        return [f"{self.folder}/{self.sop_instance_uid(case.model, case)}.dcm"]

    def write(self, case: EvidenceCase, output_dir: Path) -> list[WrittenOutput]:
        derived = [pydicom.dcmread(Path(output_dir) / out.path, stop_before_pixels=True)
                   for kind in ("sc", "pm") for out in case.written.get(kind, [])]
        sr = self.build(case, derived)
        name = self.file_names(case)[0]
        with atomic_write(Path(output_dir) / name) as tmp:
            sr.save_as(tmp, enforce_file_format=True)
        return [WrittenOutput(name, case.predicted_class, sr.SOPClassUID, sr.SOPInstanceUID, sr.SeriesInstanceUID)]

    def code_of_class(self, k: int, name: str) -> Code:
        value = self.class_codes.get(name)
        return Code(*value) if value else class_code(k, name)

    def build(self, case: EvidenceCase, derived: list[pydicom.Dataset] = ()) -> hd.sr.Comprehensive3DSR:
        """The report of ``case``; ``derived``: headers of the other DICOM outputs of the case to reference."""
        model, first = case.model, case.sources[0]
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid(self.sop_instance_uid(model, case), model, "tracking"),
                identifier=f"{model.name} classification"[:64]),
            algorithm_id=self.algorithm(model),
            source_images=self.source_references(case),
            # TID 1501's Finding (DCM 121071) row: highdicom writes and reads it as the group's finding type
            finding_type=self.code_of_class(case.predicted_class, case.class_name(case.predicted_class)),
            measurements=[hd.sr.Measurement(name=probability_code(k, case.class_name(k)), value=float(p),
                                            unit=codes.UCUM.NoUnits)
                          for k, p in enumerate(case.probabilities)],
        )
        def report(library: list[pydicom.Dataset] | None) -> hd.sr.MeasurementReport:
            return hd.sr.MeasurementReport(
                observation_context=hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
                    observer_type=codes.DCM.Device,
                    observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                        uid=derived_uid("observer", model, "device"), name=model.name[:64],
                        manufacturer_name=model.manufacturer, model_name=model.name[:64]))),
                procedure_reported=PROCEDURES.get(str(first.get("Modality", "")), IMAGING_PROCEDURE),
                imaging_measurements=[group], referenced_images=library)

        # TID 1500's image library is optional. highdicom describes an entry from top-level image plane
        # attributes, which an enhanced multi-frame image keeps per frame, and it cannot describe a CT or MR
        # image without its plane (a PixelSpacing of 0\0 is dropped as non-conformant), a radiograph
        # without ImagerPixelSpacing, or either with an empty Type 2 value it reads (PatientOrientation,
        # SliceThickness): such a report has no library.
        try:
            content = report(None if is_enhanced_volume(first) else case.sources)
        except (AttributeError, IndexError, TypeError, ValueError):
            content = report(None)
        evidence = [_with_patient_and_study(first), *case.sources[1:], *derived]
        return hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=content,
            series_instance_uid=derived_uid(first.SeriesInstanceUID, model, "structured-report-series"),
            series_number=self.series_number,
            sop_instance_uid=self.sop_instance_uid(model, case),
            instance_number=int(first.get("InstanceNumber") or 1),
            manufacturer=model.manufacturer,
            is_complete=True,
            series_description=f"SoftCAM findings ({RESEARCH_NOTE})"[:64],
            manufacturer_model_name=model.name[:64],
            software_versions=model.version,
            device_serial_number=model.weights_digest or "none",
            coding_schemes=[CodingSchemeIdentificationItem(
                PRIVATE_SCHEME, name="SoftCAM bundle classes and probabilities", version=model.version,
                responsible_organization=model.manufacturer)],
        )

    @staticmethod
    def algorithm(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(name=model.name[:64], version=model.version[:64],
                                             parameters=[f"weights {model.weights_digest}"] if model.weights_digest else None,
                                             manufacturer=model.manufacturer)

    @staticmethod
    def source_references(case: EvidenceCase) -> list[hd.sr.SourceImageForMeasurementGroup]:
        """Every source instance of the case (each slice of a series, a multi-frame volume whole); one frame of a
        multi-frame image by its number where its SOP class allows (as the Secondary Capture references it)."""
        frame = case.input.frame
        return [hd.sr.SourceImageForMeasurementGroup(
            ds.SOPClassUID, ds.SOPInstanceUID,
            [frame + 1] if frame is not None and ds.SOPClassUID in MULTI_FRAME_SOP_CLASSES else None)
            for ds in case.sources]


def _with_patient_and_study(source: pydicom.Dataset) -> pydicom.Dataset:
    """``source`` (a conformant header) with the Type 2 patient and study attributes present, empty if unknown."""
    reference = pydicom.Dataset(source)
    for keyword in PATIENT_AND_STUDY:
        if keyword not in reference:
            setattr(reference, keyword, None)
    return reference
