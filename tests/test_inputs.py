import pydicom
import pytest

from bundle.inputs import discover_inputs


def _reasons(failures):
    return {f.path.name: f.reason for f in failures}


def test_a_2d_model_gets_every_image_and_every_frame(mixed_folder):
    inputs, failures = discover_inputs(mixed_folder, spatial_dims=2)
    names = [i.name.removeprefix(str(mixed_folder) + "/") for i in inputs]
    assert "CT_small.dcm" in names and "JPEG2000.dcm" in names and "volume.nii.gz" in names
    assert "SC_rgb_rle_2frame.dcm#frame1" in names and "SC_rgb_rle_2frame.dcm#frame2" in names
    assert sum(n.startswith("ct_series/") for n in names) == 12  # one input per slice
    reasons = _reasons(failures)
    assert reasons["empty.dcm"] == "file is empty"
    assert reasons["notes.txt"].startswith("not a readable DICOM or NIfTI file")
    assert reasons["truncated.dcm"].startswith("file is truncated")
    assert reasons["header_only.dcm"] == "DICOM file holds no pixel data (CT Image Storage)"
    assert reasons["no_pixels.dcm"] == "DICOM file holds no pixel data (CT Image Storage)"
    assert reasons["video.dcm"].startswith("unsupported transfer syntax MPEG2")


def test_a_3d_model_gets_series_as_volumes(mixed_folder):
    inputs, failures = discover_inputs(mixed_folder, spatial_dims=3)
    by_kind = {i.kind: i for i in inputs}
    assert set(by_kind) == {"dicom-series", "dicom-multiframe", "nifti"}
    series = by_kind["dicom-series"]
    assert len(series.files) == 12
    positions = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in series.files]
    assert positions == sorted(positions)  # slice order
    reasons = _reasons(failures)
    assert reasons["CT_small.dcm"] == "a single 2D image cannot be the input of a 3D model"
    assert "video.dcm" in reasons and "empty.dcm" in reasons


def test_a_missing_input_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="input folder not found"):
        discover_inputs(tmp_path / "nowhere", 2)


def test_deflated_and_preamble_less_files_are_inputs_and_junk_is_not(tmp_path):
    from pydicom.data import get_testdata_file
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from tests.dicom_matrix import without_preamble

    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    ds.decompress()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)  # smaller than its inflated pixel data
    (tmp_path / "old_style.dcm").write_bytes(without_preamble(pydicom.dcmread(get_testdata_file("CT_small.dcm"))))
    (tmp_path / "junk.dcm").write_bytes(b"\x08\x00\x10\x00" + b"junk" * 100)
    inputs, failures = discover_inputs(tmp_path, spatial_dims=2)
    assert sorted(i.name.removeprefix(str(tmp_path) + "/") for i in inputs) == [
        "deflated.dcm#frame1", "deflated.dcm#frame2", "old_style.dcm"]
    assert [(f.path.name, f.reason.split(" (")[0]) for f in failures] == [("junk.dcm", "not a readable DICOM or NIfTI file")]
