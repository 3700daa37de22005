"""MONAI dictionary transforms that load and prepare DICOM and NIfTI images; usable from configs."""

from transforms.channels import MatchChannelsd
from transforms.dicom import DicomReader, InvertMonochrome1d, image_description, medical_image_readers
from transforms.intensity import WindowIntensityd, window_bounds

__all__ = [
    "DicomReader",
    "InvertMonochrome1d",
    "MatchChannelsd",
    "WindowIntensityd",
    "image_description",
    "medical_image_readers",
    "window_bounds",
]
