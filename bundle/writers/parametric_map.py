"""Evidence maps as DICOM Parametric Maps: the float evidence values themselves, for software."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from bundle.files import atomic_write
from bundle.writers.base import EvidenceCase, EvidenceWriter, WrittenOutput
from bundle.writers.common import RESEARCH_NOTE, ModelIdentity, copy_body_part, derived_uid
from bundle.writers.planes import source_planes
from transforms.dicom import is_enhanced_volume


class ParametricMapNotApplicable(ValueError):
    """The source has no Frame of Reference or no image plane (projection X-ray, NM, ...): a
    Parametric Map cannot be placed on it, and the Secondary Capture alone carries the evidence."""


def plane_problem(sources: list[pydicom.Dataset]) -> str | None:
    """Why a Parametric Map cannot be placed on ``sources`` (no Frame of Reference, no image plane), or None."""
    first = sources[0]
    plane = () if is_enhanced_volume(first) else ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
    missing = [k for k in ("FrameOfReferenceUID", *plane) if k not in first]
    if not missing:
        return None
    what = "Frame of Reference" if "FrameOfReferenceUID" in missing else "image plane (" + ", ".join(missing) + ")"
    return f"{first.get('Modality', 'this')} image has no {what}: no Parametric Map, the Secondary Capture carries the evidence"


class ParametricMapWriter(EvidenceWriter):
    """The float32 evidence map of each written class (raw or contrast: the run's ``evidence_map``) over one
    source image (or series, or enhanced multi-frame volume) as a Parametric Map:
    ``dicom/parametric_map/<SOP Instance UID>.dcm``.

    Only for sources with a Frame of Reference and an image plane (CT, MR, ...); for others, and for
    single frames of multi-frame files (which would need per-frame references), ``skip_reason`` says
    why. Values are stored as the model's maps give them with an identity real world value mapping
    (no unit). UIDs derive from the sources and the model, as for the Secondary Captures.
    """

    kind = "pm"

    def __init__(self, series_number: int = 9002, folder: str = "dicom/parametric_map"):
        self.series_number = series_number
        self.folder = folder

    def skip_reason(self, case: EvidenceCase) -> str | None:
        if not case.sources:
            return f"{case.input.kind} inputs have no DICOM source: no Parametric Map"
        if case.input.kind == "dicom-frame":
            return "single frames of multi-frame images get no Parametric Map: the Secondary Captures carry the evidence"
        return plane_problem(case.sources)

    def sop_instance_uid(self, model: ModelIdentity, sources: list[pydicom.Dataset], class_name: str) -> str:
        """The map's SOP Instance UID: derived from every source instance, the class and the model."""
        return derived_uid("/".join(ds.SOPInstanceUID for ds in sources), model, f"parametric-map/{class_name}")

    def file_names(self, case: EvidenceCase) -> list[str]:
        return [f"{self.folder}/{self.sop_instance_uid(case.model, case.sources, case.class_name(k))}.dcm"
                for k in case.classes]

    def write(self, case: EvidenceCase, output_dir: Path) -> list[WrittenOutput]:
        written = []
        for k, name in zip(case.classes, self.file_names(case)):
            planes = source_planes(case, case.evidence[k])  # (n, rows, cols) in source order
            pm = self.build(case.sources, planes if len(planes) > 1 else planes[0], case.class_name(k), case.model)
            with atomic_write(Path(output_dir) / name) as tmp:
                pm.save_as(tmp, enforce_file_format=True)
            written.append(WrittenOutput(name, k, pm.SOPClassUID, pm.SOPInstanceUID, pm.SeriesInstanceUID))
        return written

    def build(self, sources: list[pydicom.Dataset], evidence: np.ndarray, class_name: str,
              model: ModelIdentity) -> hd.pm.ParametricMap:
        """``evidence``: (rows, cols) for one source image, (n, rows, cols) for n source slices, or
        (frames, rows, cols) for one enhanced multi-frame source (its plane positions in its functional
        groups). Raises ``ParametricMapNotApplicable`` where ``plane_problem`` finds one."""
        problem = plane_problem(sources)
        if problem:
            raise ParametricMapNotApplicable(problem)
        first = sources[0]
        values = np.asarray(evidence, dtype=np.float32)
        if values.ndim == 2:
            values = values[None]
        low, high = float(values.min()), float(values.max())
        if high <= low:
            high = low + 1.0
        mapping = hd.pm.RealWorldValueMapping(
            lut_label="EVIDENCE",
            lut_explanation=f"SoftCAM {model.evidence_map} evidence for {class_name}"[:64],
            unit=codes.UCUM.NoUnits,
            value_range=(low, high),
            slope=1.0,
            intercept=0.0,
        )
        pm = hd.pm.ParametricMap(
            source_images=sources,
            pixel_array=values,
            series_instance_uid=derived_uid(first.SeriesInstanceUID, model, "parametric-map-series"),
            series_number=self.series_number,
            sop_instance_uid=self.sop_instance_uid(model, sources, class_name),
            instance_number=1,
            manufacturer=model.manufacturer,
            manufacturer_model_name=model.name[:64],
            software_versions=model.version,
            device_serial_number=model.weights_digest or "none",
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            # LINEAR_EXACT: evidence can span less than 1, which a LINEAR window may not
            voi_lut_transformations=[hd.VOILUTTransformation(
                window_center=(low + high) / 2, window_width=high - low,
                voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT,
            )],
            content_label="EVIDENCE",
            content_description=f"SoftCAM class evidence, {RESEARCH_NOTE}"[:64],
            content_qualification=hd.ContentQualificationValues.RESEARCH,
        )
        pm.SeriesDescription = f"SoftCAM evidence values ({RESEARCH_NOTE})"[:64]
        pm.DerivationDescription = f"SoftCAM {model.map_title} for '{class_name}' by {model.description}"[:1024]
        copy_body_part(first, pm)
        return pm
