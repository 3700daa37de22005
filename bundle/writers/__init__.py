"""Writers that turn evidence maps into files: DICOM Secondary Capture and Parametric Map."""

from bundle.writers.common import ModelIdentity, atomic_write, derived_uid
from bundle.writers.parametric_map import NoFrameOfReference, ParametricMapWriter
from bundle.writers.secondary_capture import SecondaryCaptureWriter

__all__ = ["ModelIdentity", "NoFrameOfReference", "ParametricMapWriter", "SecondaryCaptureWriter", "atomic_write", "derived_uid"]
