"""The image reader of the bundle's configs: NIfTI or DICOM, chosen by the file rather than by trial."""

from __future__ import annotations

from collections.abc import Sequence

import pydicom
from monai.data import ImageReader, NibabelReader
from monai.utils import ensure_tuple

from transforms.dicom import DicomReader

# what nibabel reads: NIfTI-1/2 (plain or gzipped), Analyze pairs, FreeSurfer MGH
NIFTI_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr", ".mgz")


def is_nifti_path(name) -> bool:
    return str(name).lower().endswith(NIFTI_SUFFIXES)


class MedicalImageReader(ImageReader):
    """NIfTI (and what nibabel reads) by suffix, anything else as a DICOM file or series folder.

    ``LoadImage`` given several readers tries them in turn and logs an INFO line for every one that
    fails: with NIfTI and DICOM readers, one line per file ("DicomReader: unable to load mask.nii.gz").
    One reader that knows which of the two applies reads every file first time, without those lines.
    ``dicom_kwargs`` go to ``DicomReader`` (and so to ``pydicom.dcmread``).
    """

    def __init__(self, **dicom_kwargs):
        super().__init__()
        self.nifti = NibabelReader()
        self.dicom = DicomReader(**dicom_kwargs)

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        return True  # DICOM files have any name, or none

    def read(self, data, **kwargs):
        reader = self.nifti if all(is_nifti_path(n) for n in ensure_tuple(data)) else self.dicom
        return reader.read(data, **kwargs)

    def get_data(self, img) -> tuple:
        first = img
        while isinstance(first, (list, tuple)) and first:
            first = first[0]
        return (self.dicom if isinstance(first, pydicom.Dataset) else self.nifti).get_data(img)


def medical_image_readers() -> list[ImageReader]:
    """Readers for ``LoadImaged``: one ``MedicalImageReader`` (DICOM files and series folders, NIfTI)."""
    return [MedicalImageReader()]
