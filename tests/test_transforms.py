import logging
import math
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from pydicom.data import get_testdata_file

import transforms

PIPELINE = Compose([
    LoadImaged("image", reader=transforms.medical_image_readers(), image_only=True),
    EnsureChannelFirstd("image"),
    transforms.InvertMonochrome1d("image"),
])
MONOCHROME1_CR = "dicomdirtests/77654033/CR1/6154"


def load(path):
    return PIPELINE({"image": str(path)})["image"]


def test_ct_is_loaded_in_hounsfield_units():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    image = load(get_testdata_file("CT_small.dcm"))
    assert image.shape == (1, 128, 128)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.allclose(np.sort(image.numpy().ravel()), np.sort(expected.ravel()))
    assert image.meta["modality"] == "CT"


def test_mr_is_loaded_with_its_dicom_window():
    image = load(get_testdata_file("MR_small.dcm"))
    assert image.shape == (1, 64, 64)
    windowed = transforms.WindowIntensityd("image")({"image": image})["image"]
    assert image.meta["window_center"] == 600.0
    assert float(windowed.min()) >= 0.0 and float(windowed.max()) == 1.0


def test_monochrome1_is_inverted():
    path = get_testdata_file(MONOCHROME1_CR)
    raw = LoadImaged("image", reader=transforms.DicomReader(), image_only=True)({"image": path})["image"]
    image = load(path)
    assert raw.meta["photometric_interpretation"] == "MONOCHROME1"
    assert image.meta["photometric_interpretation"] == "MONOCHROME2"
    assert torch.allclose(image[0], -raw)
    assert image.meta["window_center"] == -raw.meta["window_center"]


@pytest.mark.parametrize("name", ["examples_rgb_color.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_colour_images_come_channel_first_and_can_become_grey(name):
    image = load(get_testdata_file(name))
    assert image.shape[0] == 3
    grey = transforms.MatchChannelsd("image", channels=1)({"image": image})["image"]
    assert grey.shape == (1, *image.shape[1:])
    expected = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    assert torch.allclose(grey[0], expected, atol=1e-4)


def test_grey_images_can_be_repeated_to_three_channels():
    image = load(get_testdata_file("CT_small.dcm"))
    assert transforms.MatchChannelsd("image", channels=3)({"image": image})["image"].shape == (3, 128, 128)


def test_dicom_series_folder_stacks_only_dicom_files(tmp_path):
    folder = tmp_path / "series"
    shutil.copytree(Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests/77654033/CT2", folder)
    (folder / "README.txt").write_text("not a DICOM file")
    assert load(folder).shape == (1, 16, 16, 4)


def test_nifti_is_loaded_with_its_affine():
    path = nibabel.__file__.rsplit("/", 1)[0] + "/tests/data/anatomical.nii"
    image = load(path)
    assert image.shape == (1, 33, 41, 25)
    assert np.allclose(image.affine.numpy(), nibabel.load(path).affine)


def test_no_patient_identifiers_reach_the_pipeline_metadata():
    image = load(get_testdata_file("CT_small.dcm"))
    text = repr(dict(image.meta))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for value in (str(ds.PatientName), ds.PatientID, ds.StudyInstanceUID, ds.SOPInstanceUID):
        assert value not in text
    assert not any(k.isdigit() and len(k) == 8 for k in image.meta if isinstance(k, str))


def test_window_known_answers():
    image = MetaTensor(torch.tensor([[-100.0, 0.0, 40.0, 80.0, 500.0]]))
    out = transforms.WindowIntensityd("image", window=(40, 80))({"image": image})["image"]
    assert torch.allclose(out, torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))
    ramp = MetaTensor(torch.arange(1001, dtype=torch.float32).view(1, -1))
    out = transforms.WindowIntensityd("image", percentiles=(10, 90))({"image": ramp})["image"]
    assert out[0, 100].item() == pytest.approx(0.0) and out[0, 500].item() == pytest.approx(0.5)
    assert out[0, 900].item() == pytest.approx(1.0)
    # a NaN DICOM window (none in the file) falls back to percentiles
    ramp.meta["window_center"], ramp.meta["window_width"] = math.nan, math.nan
    assert transforms.WindowIntensityd("image")({"image": ramp})["image"].max() == 1.0


@pytest.mark.parametrize("name, syntax", [
    ("SC_rgb_jpeg_dcmtk.dcm", "JPEG Baseline"),
    ("SC_rgb_jpeg_gdcm.dcm", "JPEG Lossless"),
    ("SC_rgb_jls_lossy_line.dcm", "JPEG-LS"),
    ("JPEG2000.dcm", "JPEG 2000"),
    ("SC_rgb_rle.dcm", "RLE Lossless"),
])
def test_compressed_transfer_syntaxes_decode(name, syntax):
    path = get_testdata_file(name)
    assert syntax in pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
    image = load(path)
    assert image.numel() > 0 and float(image.max()) > float(image.min())


def test_lossless_jpeg2000_decodes_to_the_uncompressed_pixels():
    compressed = load(get_testdata_file("MR_small_jp2klossless.dcm"))
    assert torch.equal(compressed, load(get_testdata_file("MR_small.dcm")))


def test_palette_colour_is_loaded_through_its_lookup_tables():
    path = get_testdata_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    image = LoadImaged("image", reader=transforms.medical_image_readers(), image_only=True)({"image": path})["image"]
    assert image.shape == (ds.Columns, ds.Rows, 3) and image.meta["samples_per_pixel"] == 3
    expected = pydicom.pixels.apply_color_lut(ds.pixel_array, ds).astype(np.float32)
    assert torch.equal(image, torch.as_tensor(np.swapaxes(expected, 0, 1)))
    assert load(path).shape == (3, ds.Columns, ds.Rows)  # channel first, like any colour image


def test_a_frame_is_decoded_alone_as_the_whole_file_decodes_it():
    path = get_testdata_file("SC_rgb_rle_2frame.dcm")
    whole = pydicom.dcmread(path).pixel_array
    for frame in (0, 1):
        image, header = transforms.dicom_frame(path, frame)
        assert torch.equal(image, torch.as_tensor(np.swapaxes(whole[frame], 0, 1).astype(np.float32)))
        assert header.SOPInstanceUID == pydicom.dcmread(path).SOPInstanceUID and "PixelData" in header


def test_a_multiframe_image_that_is_not_a_volume_is_laid_out_frames_last():
    path = get_testdata_file("SC_rgb_rle_2frame.dcm")
    whole = pydicom.dcmread(path).pixel_array  # (frames, rows, cols, 3)
    image = LoadImaged("image", reader=transforms.DicomReader(), image_only=True)({"image": path})["image"]
    assert image.shape == (whole.shape[2], whole.shape[1], 2, 3)
    assert torch.equal(image[..., 1, :], torch.as_tensor(np.swapaxes(whole[1], 0, 1).astype(np.float32)))


def test_a_pixel_spacing_with_a_zero_is_ignored_rather_than_giving_a_singular_affine(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelSpacing = [0, 0]
    ds.save_as(tmp_path / "zero.dcm")
    affine = load(tmp_path / "zero.dcm").affine.numpy()
    assert np.isfinite(affine).all() and abs(np.linalg.det(affine[:3, :3])) > 0


def test_one_reader_reads_nifti_and_dicom_without_a_line_per_file(caplog):
    nifti = nibabel.__file__.rsplit("/", 1)[0] + "/tests/data/anatomical.nii"
    with caplog.at_level(logging.DEBUG):
        for path in (nifti, get_testdata_file("CT_small.dcm")):
            load(path)
    assert [r.getMessage() for r in caplog.records if r.name == "LoadImage"] == []


def test_a_series_folder_skips_files_that_are_not_dicom_images(tmp_path):
    folder = tmp_path / "series"
    shutil.copytree(Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests/77654033/CT2", folder)
    (folder / "notes.txt").write_text("not a DICOM file")
    shutil.copy(get_testdata_file("DICOMDIR"), folder / "DICOMDIR")  # DICOM, but no image
    assert load(folder).shape == (1, 16, 16, 4)
