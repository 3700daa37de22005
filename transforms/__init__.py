"""MONAI dictionary transforms that load and prepare DICOM and NIfTI images; usable from configs."""

from transforms.channels import MatchChannelsd
from transforms.dicom import DicomReader, InvertMonochrome1d, dicom_frame, image_description, read_dicom
from transforms.intensity import WindowIntensityd, window_bounds
from transforms.readers import MedicalImageReader, medical_image_readers

__all__ = [
    "DicomReader",
    "InvertMonochrome1d",
    "MatchChannelsd",
    "MedicalImageReader",
    "WindowIntensityd",
    "dicom_frame",
    "image_description",
    "medical_image_readers",
    "read_dicom",
    "window_bounds",
]
