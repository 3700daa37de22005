import json
import shutil

import pydicom
import pytest
from pydicom.data import get_testdata_file

from bundle.data import DatalistError, load_datalist
from tests.conftest import run_bundle


def _write_datalist(folder, training, validation=(), test=()):
    (folder / "datalist.json").write_text(json.dumps(
        {"training": list(training), "validation": list(validation), "test": list(test)}))


def test_a_valid_datalist_is_returned_with_absolute_paths(dataset_2d):
    datalist = load_datalist(dataset_2d, num_classes=2)
    assert sum(len(v) for v in datalist.values()) == 24
    first = datalist["training"][0]
    assert first["image"].startswith(str(dataset_2d.resolve()))


def test_every_bad_entry_is_reported_naming_the_entry_and_the_file(tmp_path):
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "good.dcm")
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "garbage.dcm").write_bytes(b"this is not DICOM" * 20)
    report = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del report.PixelData
    report.save_as(tmp_path / "no_pixels.dcm")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (tmp_path / "truncated.dcm").write_bytes((tmp_path / "good.dcm").read_bytes()[:-1000])
    _write_datalist(tmp_path, [
        {"image": "good.dcm", "label": 0},
        {"image": "missing.dcm", "label": 1},
        {"image": "empty.dcm", "label": 0},
        {"image": "garbage.dcm", "label": 1},
        {"image": "no_pixels.dcm", "label": 1},
        {"image": "broken.nii.gz", "label": 0},
        {"image": "good.dcm", "label": 5},
        {"image": "good.dcm", "label": 1, "mask": "no_mask.nii.gz"},
        {"image": "truncated.dcm", "label": 1},
    ])
    with pytest.raises(DatalistError) as err:
        load_datalist(tmp_path, num_classes=2)
    problems = err.value.problems
    assert len(problems) == 8
    message = str(err.value)
    for expected in ("training[1] image missing.dcm: file not found",
                     "training[2] image empty.dcm: file is empty",
                     "training[3] image garbage.dcm: not a readable DICOM file",
                     "training[4] image no_pixels.dcm: DICOM file holds no pixel data",
                     "training[5] image broken.nii.gz: not a readable NIfTI file",
                     "training[6] good.dcm: label 5 is not a class index in [0, 2)",
                     "training[7] mask no_mask.nii.gz: file not found",
                     "training[8] image truncated.dcm: file is truncated"):
        assert expected in message


def test_a_missing_datalist_is_a_clear_error(tmp_path):
    with pytest.raises(DatalistError, match="datalist not found"):
        load_datalist(tmp_path)


def test_training_stops_before_it_starts_with_a_message_not_a_traceback(tmp_path, dataset_2d):
    data = tmp_path / "data"
    shutil.copytree(dataset_2d, data)
    victim = sorted((data / "images").glob("*.dcm"))[5]
    victim.write_bytes(b"truncated")
    result = run_bundle("--config_file", "configs/train.json", "--dataset_dir", str(data),
                        "--output_dir", str(tmp_path / "eval"), "--ckpt_dir", str(tmp_path / "models"))
    assert result.returncode == 1
    assert f"image images/{victim.name}: not a readable DICOM file" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models" / "model.pt").exists()
