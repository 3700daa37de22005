import hashlib
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from scipy import ndimage

import transforms
from bundle.synthetic import make_dataset
from tests.conftest import dicom_validation_errors


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generation_is_deterministic(tmp_path, dataset_2d):
    again = tmp_path / "again"
    make_dataset(again, dims=2, n=24, seed=3, size=64)
    assert _digest(again) == _digest(dataset_2d)
    other = tmp_path / "other"
    make_dataset(other, dims=2, n=4, seed=4, size=64)
    assert _digest(other)["images/case_00000.dcm"] != _digest(dataset_2d)["images/case_00000.dcm"]


def test_datalist_splits_are_stratified_and_masks_go_with_positives(dataset_2d):
    datalist = json.loads((dataset_2d / "datalist.json").read_text())
    items = datalist["training"] + datalist["validation"] + datalist["test"]
    assert len(items) == 24 and len({it["image"] for it in items}) == 24
    for split in ("training", "validation", "test"):
        assert {it["label"] for it in datalist[split]} == {0, 1}
    assert all(("mask" in it) == (it["label"] == 1) for it in items)


def test_radiographs_are_cr_dicom_with_their_own_identities(dataset_2d):
    files = sorted((dataset_2d / "images").glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    assert {ds.Modality for ds in datasets} == {"CR"}
    assert all(12 <= ds.BitsStored <= 16 and ds.PixelSpacing for ds in datasets)
    assert {ds.PhotometricInterpretation for ds in datasets} == {"MONOCHROME1", "MONOCHROME2"}
    for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert len({ds.data_element(keyword).value for ds in datasets}) == len(files), keyword


def test_radiographs_pass_dciodvfy(dataset_2d):
    for path in sorted((dataset_2d / "images").glob("*.dcm"))[:4]:
        assert dicom_validation_errors(path) == [], path


def _loaded(dataset_dir, item):
    image = Compose([LoadImaged("image", reader=transforms.medical_image_readers(), image_only=True),
                     EnsureChannelFirstd("image"), transforms.InvertMonochrome1d("image"),
                     transforms.WindowIntensityd("image")])({"image": str(dataset_dir / item["image"])})["image"]
    mask = Compose([LoadImaged("mask", image_only=True), EnsureChannelFirstd("mask")])(
        {"mask": str(dataset_dir / item["mask"])})["mask"]
    return image[0].numpy(), mask[0].numpy()


@pytest.mark.parametrize("dataset", ["dataset_2d", "dataset_3d"])
def test_masks_line_up_with_the_lesions(dataset, request):
    dataset_dir = request.getfixturevalue(dataset)
    datalist = json.loads((dataset_dir / "datalist.json").read_text())
    positives = [it for split in ("training", "validation", "test") for it in datalist[split] if it["label"]]
    for item in positives:
        image, mask = _loaded(dataset_dir, item)
        assert image.shape == mask.shape
        assert mask.sum() > 0
        lesion = mask > 0
        # the ring just outside the mask is background: the lesion is brighter than what surrounds it
        ring = ndimage.binary_dilation(lesion, iterations=2) & ~lesion
        assert image[lesion].mean() > image[ring].mean(), item["image"]


def test_volumes_are_nifti_with_a_real_affine_shared_by_their_masks(dataset_3d):
    datalist = json.loads((dataset_3d / "datalist.json").read_text())
    item = next(it for it in datalist["training"] if it["label"])
    image, mask = nib.load(dataset_3d / item["image"]), nib.load(dataset_3d / item["mask"])
    assert image.shape == mask.shape == (32, 32, 24)
    assert np.allclose(image.affine, mask.affine)
    assert not np.allclose(image.affine, np.eye(4))
    hu = np.asarray(image.dataobj)
    assert hu.min() <= -900 and hu.max() >= 100  # air and soft tissue / bone in Hounsfield units


def test_volumes_as_dicom_series_load_back_to_the_nifti_array_and_affine(tmp_path):
    from monai.transforms import LoadImage

    datalist = make_dataset(tmp_path, dims=3, n=3, seed=5, size=24, dicom_series=True)
    item = datalist["training"][0]
    assert item["image"].startswith("series/")
    series = LoadImage(reader=transforms.DicomReader(), image_only=True)(str(tmp_path / item["image"]))
    nifti = nib.load(tmp_path / (item["image"].replace("series/", "images/") + ".nii.gz"))
    assert np.array_equal(series.numpy(), nifti.get_fdata())
    assert np.allclose(series.affine.numpy(), nifti.affine, atol=1e-4)
    slices = sorted((tmp_path / item["image"]).glob("*.dcm"))
    assert len(slices) == nifti.shape[2]
    assert len({pydicom.dcmread(s).SeriesInstanceUID for s in slices}) == 1
    for path in (slices[0], slices[-1]):
        assert dicom_validation_errors(path) == [], path


@pytest.mark.parametrize("dims, size", [(2, 64), (3, 32)])
def test_lesion_size_and_contrast_change_only_the_lesion(tmp_path, dims, size):
    settings = {"default": {}, "large": {"lesion_size": 2.0}, "faint": {"lesion_contrast": 0.5}}
    lists = {name: make_dataset(tmp_path / name, dims=dims, n=6, seed=7, size=size, **kw) for name, kw in settings.items()}
    assert lists["faint"]["description"].endswith("lesion contrast x0.5")
    items = [it for split in ("training", "validation", "test") for it in lists["default"][split]]
    negatives, positives = [it for it in items if not it["label"]], [it for it in items if it["label"]]
    digests = {name: _digest(tmp_path / name) for name in settings}
    for item in negatives:  # the same random draws: a lesion-free case is the same file
        assert digests["large"][item["image"]] == digests["faint"][item["image"]] == digests["default"][item["image"]]
    area = {name: sum(int(np.asarray(nib.load(tmp_path / name / it["mask"]).dataobj).sum()) for it in positives)
            for name in settings}
    doubled_radius = 2.0**dims  # area (2D) or volume (3D) of a lesion of twice the radius
    assert 0.7 * doubled_radius < area["large"] / area["default"] < 1.3 * doubled_radius
    assert area["faint"] == area["default"]  # same lesions, only fainter

    def contrast(name):  # mean lesion intensity over that of the ring around it, summed over positives
        total = 0.0
        for item in positives:
            image, mask = _loaded(tmp_path / name, item)
            lesion = mask > 0
            ring = ndimage.binary_dilation(lesion, iterations=2) & ~lesion
            total += image[lesion].mean() - image[ring].mean()
        return total

    assert 0 < contrast("faint") < 0.75 * contrast("default")


def test_lesion_options_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="lesion_size and lesion_contrast must be > 0"):
        make_dataset(tmp_path, n=2, size=32, lesion_contrast=0)
