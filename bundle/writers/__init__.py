"""Writers that turn evidence maps into files: DICOM Secondary Capture and Parametric Map."""

import logging

from bundle.writers.common import ModelIdentity, atomic_write, derived_uid
from bundle.writers.parametric_map import ParametricMapNotApplicable, ParametricMapWriter
from bundle.writers.secondary_capture import SecondaryCaptureWriter

# highdicom logs the source's SOP Instance UID at INFO level for every object it builds: UIDs
# identify patients, so they must not reach the logs whatever logging config a user runs with.
logging.getLogger("highdicom").setLevel(logging.WARNING)

__all__ = [
    "ModelIdentity",
    "ParametricMapNotApplicable",
    "ParametricMapWriter",
    "SecondaryCaptureWriter",
    "atomic_write",
    "derived_uid",
]
