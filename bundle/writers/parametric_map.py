"""Evidence maps as DICOM Parametric Maps: the float evidence values themselves, for software."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from bundle.writers.common import RESEARCH_NOTE, ModelIdentity, atomic_write, copy_body_part, derived_uid
from transforms.dicom import is_enhanced_volume


class ParametricMapNotApplicable(ValueError):
    """The source has no Frame of Reference or no image plane (projection X-ray, NM, ...): a
    Parametric Map cannot be placed on it, and the Secondary Capture alone carries the evidence."""


class ParametricMapWriter:
    """Write the raw float32 evidence of one source image (or one series) as a Parametric Map.

    Only for sources with a Frame of Reference and an image plane (CT, MR, ...); for others ``build``
    raises ``ParametricMapNotApplicable`` with the reason, so callers can log it and go on. Values are stored
    as they came out of the model with an identity real world value mapping (no unit).
    UIDs derive from the sources and the model, as for the Secondary Captures.
    """

    def __init__(self, model: ModelIdentity, series_number: int = 9002):
        self.model = model
        self.series_number = series_number

    def sop_instance_uid(self, sources: list[pydicom.Dataset], class_name: str) -> str:
        """The map's SOP Instance UID: derived from every source instance, the class and the model."""
        return derived_uid("/".join(ds.SOPInstanceUID for ds in sources), self.model, f"parametric-map/{class_name}")

    def build(self, sources: list[pydicom.Dataset], evidence: np.ndarray, class_name: str) -> hd.pm.ParametricMap:
        """``evidence``: (rows, cols) for one source image, (n, rows, cols) for n source slices, or
        (frames, rows, cols) for one enhanced multi-frame source (its plane positions in its functional groups)."""
        first = sources[0]
        plane = () if is_enhanced_volume(first) else ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
        missing = [k for k in ("FrameOfReferenceUID", *plane) if k not in first]
        if missing:
            what = "Frame of Reference" if "FrameOfReferenceUID" in missing else "image plane (" + ", ".join(missing) + ")"
            raise ParametricMapNotApplicable(
                f"{first.get('Modality', 'this')} image has no {what}: no Parametric Map, "
                "the Secondary Capture carries the evidence"
            )
        values = np.asarray(evidence, dtype=np.float32)
        if values.ndim == 2:
            values = values[None]
        low, high = float(values.min()), float(values.max())
        if high <= low:
            high = low + 1.0
        mapping = hd.pm.RealWorldValueMapping(
            lut_label="EVIDENCE",
            lut_explanation=f"SoftCAM evidence for {class_name}"[:64],
            unit=codes.UCUM.NoUnits,
            value_range=(low, high),
            slope=1.0,
            intercept=0.0,
        )
        return hd.pm.ParametricMap(
            source_images=sources,
            pixel_array=values,
            series_instance_uid=derived_uid(first.SeriesInstanceUID, self.model, "parametric-map-series"),
            series_number=self.series_number,
            sop_instance_uid=self.sop_instance_uid(sources, class_name),
            instance_number=1,
            manufacturer=self.model.manufacturer,
            manufacturer_model_name=self.model.name[:64],
            software_versions=self.model.version,
            device_serial_number=self.model.weights_digest or "none",
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

    def write(self, path: Path, sources: list[pydicom.Dataset], evidence: np.ndarray, class_name: str) -> Path:
        """Build the Parametric Map and write it to ``path`` atomically (temporary name, then rename)."""
        pm = self.build(sources, evidence, class_name)
        pm.SeriesDescription = f"SoftCAM evidence values ({RESEARCH_NOTE})"[:64]
        pm.DerivationDescription = f"SoftCAM class evidence map for '{class_name}' by {self.model.description}"[:1024]
        copy_body_part(sources[0], pm)
        with atomic_write(Path(path)) as tmp:
            pm.save_as(tmp, enforce_file_format=True)
        return Path(path)
