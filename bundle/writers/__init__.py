"""Writers of an inference run's outputs, as plug-ins listed in configs/inference.json (``writers``).

Each implements ``bundle.writers.base.EvidenceWriter``: the NIfTI map, the PNG overlay, the DICOM
Secondary Capture, the DICOM Parametric Map and the DICOM
Structured Report (TID 1500) of the result. A new output is one more class and one more config id.
"""

from bundle.files import atomic_write
from bundle.writers.base import EvidenceCase, EvidenceWriter, WrittenOutput
from bundle.writers.common import ModelIdentity, derived_uid
from bundle.writers.nifti import NiftiMapWriter
from bundle.writers.overlay import OverlayPngWriter
from bundle.writers.parametric_map import ParametricMapNotApplicable, ParametricMapWriter
from bundle.writers.secondary_capture import SecondaryCaptureWriter
from bundle.writers.structured_report import StructuredReportWriter

__all__ = [
    "EvidenceCase",
    "EvidenceWriter",
    "ModelIdentity",
    "NiftiMapWriter",
    "OverlayPngWriter",
    "ParametricMapNotApplicable",
    "ParametricMapWriter",
    "SecondaryCaptureWriter",
    "StructuredReportWriter",
    "WrittenOutput",
    "atomic_write",
    "derived_uid",
]
