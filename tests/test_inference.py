"""Inference end to end through ``monai.bundle`` over a folder as a hospital might send it."""

import csv
import json
import os
import subprocess
import sys

import highdicom as hd
import mlflow
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import LoadImage

import transforms
from bundle.networks import classifier
from tests.conftest import ROOT, dicom_validation_errors, run_bundle

MODEL = ["--backbone", "resnet18", "--backbone_kwargs", "{'widen_factor': 0.25}", "--image_size", "64"]
VERSION = json.loads((ROOT / "configs" / "metadata.json").read_text())["version"]


def _checkpoint(path, spatial_dims):
    torch.manual_seed(0)
    net = classifier("resnet18", spatial_dims=spatial_dims, backbone_kwargs={"widen_factor": 0.25})
    torch.save(net.state_dict(), path)
    return path


def _infer(input_dir, out, ckpt, *extra):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return run_bundle("--config_file", "configs/inference.json", "--input_dir", str(input_dir), "--output_dir", str(out),
                      "--ckpt_path", str(ckpt), *MODEL, *extra, env=env)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def inference_2d(mixed_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inference2d")
    ckpt = _checkpoint(tmp / "model.pt", 2)
    result = _infer(mixed_folder, tmp / "out", ckpt)
    return tmp / "out", result, ckpt


def test_bad_inputs_are_listed_and_the_rest_processed(inference_2d):
    out, result, _ = inference_2d
    assert result.returncode == 2, result.stderr[-2000:]
    assert "inputs could not be processed" in result.stderr
    failures = {os.path.basename(r["input"]): r["reason"] for r in _rows(out / "failures.csv")}
    assert failures["empty.dcm"] == "file is empty"
    assert failures["truncated.dcm"].startswith("file is truncated")
    assert failures["no_pixels.dcm"].startswith("DICOM file holds no pixel data")
    assert failures["video.dcm"].startswith("unsupported transfer syntax")
    assert failures["volume.nii.gz"] == "a 3D image cannot be the input of a 2D model"
    predictions = _rows(out / "predictions.csv")
    names = {os.path.basename(r["input"]) + (f"#{r['frame']}" if r["frame"] else "") for r in predictions}
    assert {"CT_small.dcm", "JPEG2000.dcm", "SC_rgb_rle_2frame.dcm#1", "SC_rgb_rle_2frame.dcm#2"} <= names
    assert len(predictions) == 3 + 12 + 1  # three files (two frames of one), twelve series slices
    for row in predictions:
        assert float(row["p_no lesion"]) + float(row["p_lesion"]) == pytest.approx(1.0, abs=1e-4)
        assert row["model_version"] == VERSION and len(row["weights"]) == 12


def test_the_log_has_no_line_per_file_for_a_reader_that_does_not_apply(inference_2d):
    _, result, _ = inference_2d
    assert "unable to load" not in result.stdout + result.stderr  # NIfTI is not tried as DICOM, nor DICOM as NIfTI


def test_every_dicom_output_passes_dciodvfy(inference_2d):
    out, _, _ = inference_2d
    files = sorted((out / "dicom").rglob("*.dcm"))
    assert len(list((out / "dicom" / "secondary_capture").glob("*.dcm"))) == 16
    # Parametric Maps only where the source has a Frame of Reference: CT_small and the CT slices
    assert len(list((out / "dicom" / "parametric_map").glob("*.dcm"))) == 13
    assert len(list((out / "dicom" / "structured_report").glob("*.dcm"))) == 16  # one report per input
    for path in files:
        assert dicom_validation_errors(path) == [], path


def test_the_nifti_map_lies_on_the_source_grid(inference_2d, mixed_folder):
    out, _, _ = inference_2d
    for name in ("CT_small", "JPEG2000"):
        evidence = nib.load(out / "maps" / f"{name}_evidence.nii.gz")
        source = LoadImage(reader=transforms.DicomReader(), image_only=True)(str(mixed_folder / f"{name}.dcm"))
        assert evidence.shape == tuple(source.shape)
        assert np.allclose(evidence.affine, source.affine.numpy())
    assert (out / "overlays" / "CT_small.png").exists()


def test_parametric_map_and_overlay_come_from_the_same_evidence(inference_2d):
    out, _, _ = inference_2d
    record = next(r for r in json.loads((out / "predictions.json").read_text()) if r["input"].endswith("CT_small.dcm"))
    pm = pydicom.dcmread(out / record["outputs"]["pm"][0])
    stored = np.frombuffer(pm.FloatPixelData, dtype=np.float32).reshape(pm.Rows, pm.Columns)
    nifti = nib.load(out / record["outputs"]["nifti"][0]).get_fdata().astype(np.float32)
    assert np.array_equal(stored, nifti.T)  # NIfTI holds (x, y) = (column, row)
    sc = pydicom.dcmread(out / record["outputs"]["sc"][0])
    pm_source = pm.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == pm_source


def test_running_again_gives_the_same_output_uids(inference_2d, mixed_folder, tmp_path):
    out, _, ckpt = inference_2d
    again = _infer(mixed_folder, tmp_path / "again", ckpt)
    assert again.returncode == 2
    first = sorted(p.name for p in (out / "dicom").rglob("*.dcm"))
    assert first == sorted(p.name for p in (tmp_path / "again" / "dicom").rglob("*.dcm"))
    assert not list((tmp_path / "again").rglob("*.part"))


def test_the_inference_run_is_tracked_without_identifiers(inference_2d, mixed_folder):
    out, result, _ = inference_2d
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("softcam-inference").experiment_id])[0]
    assert run.data.params["model_version"] == VERSION
    assert run.data.metrics["inputs_processed"] == 16
    assert run.data.metrics["inputs_failed"] == len(_rows(out / "failures.csv"))
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"predictions.csv", "overlays"}
    identifiers = set()
    for path in mixed_folder.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        identifiers |= {str(v) for v in (ds.get("PatientName"), ds.get("PatientID"), ds.get("StudyInstanceUID"),
                                          ds.get("SOPInstanceUID")) if v}
    assert list((out / "mlruns").rglob("overlay_000.png"))  # artifacts sit beside the store, and are scanned
    mlflow_store = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file() and ("mlruns" in p.parts or p.suffix == ".db"))
    logs = (result.stdout + result.stderr).encode()
    for identifier in identifiers:
        assert identifier.encode() not in mlflow_store and identifier.encode() not in logs, identifier


def test_a_3d_model_turns_a_series_into_one_input_and_writes_a_map_per_series(mixed_folder, tmp_path):
    ckpt = _checkpoint(tmp_path / "model3d.pt", 3)
    result = _infer(mixed_folder, tmp_path / "out", ckpt, "--spatial_dims", "3", "--image_size", "32")
    assert result.returncode == 2, result.stderr[-2000:]
    predictions = _rows(tmp_path / "out" / "predictions.csv")
    kinds = {r["kind"] for r in predictions}
    assert {"dicom-series", "nifti"} <= kinds
    series = next(r for r in json.loads((tmp_path / "out" / "predictions.json").read_text()) if r["kind"] == "dicom-series")
    assert len(series["outputs"]["sc"]) == 12 and len(series["outputs"]["pm"]) == 1
    pm_path = tmp_path / "out" / series["outputs"]["pm"][0]
    assert dicom_validation_errors(pm_path) == []
    assert pydicom.dcmread(pm_path).NumberOfFrames == 12
    # one report for the series: every slice is a source of its measurements, every output of the series evidence
    (sr_path,) = [tmp_path / "out" / p for p in series["outputs"]["sr"]]
    assert dicom_validation_errors(sr_path) == []
    sr = hd.sr.srread(sr_path)
    (group,) = sr.content.get_image_measurement_groups()
    slices = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (mixed_folder / "ct_series").iterdir()}
    assert {ref.referenced_sop_instance_uid for ref in group.source_images} == slices
    evidence = {item.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for s in study.ReferencedSeriesSequence for item in s.ReferencedSOPSequence}
    outputs = {pydicom.dcmread(tmp_path / "out" / p).SOPInstanceUID for p in series["outputs"]["sc"] + series["outputs"]["pm"]}
    assert evidence == slices | outputs
    volume = LoadImage(reader=transforms.DicomReader(), image_only=True)(str(mixed_folder / "ct_series"))
    evidence = nib.load(tmp_path / "out" / series["outputs"]["nifti"][0])
    assert evidence.shape == tuple(volume.shape) and np.allclose(evidence.affine, volume.affine.numpy(), atol=1e-4)


def test_a_3d_model_reads_an_enhanced_multiframe_volume_and_writes_dicom_per_frame(enhanced_ct, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / enhanced_ct.name).symlink_to(enhanced_ct)
    ckpt = _checkpoint(tmp_path / "model3d.pt", 3)
    result = _infer(folder, tmp_path / "out", ckpt, "--spatial_dims", "3", "--image_size", "32")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())[0]
    assert record["kind"] == "dicom-multiframe"
    source = pydicom.dcmread(enhanced_ct)
    frames = int(source.NumberOfFrames)
    volume = LoadImage(reader=transforms.DicomReader(), image_only=True)(str(enhanced_ct))
    evidence = nib.load(tmp_path / "out" / record["outputs"]["nifti"][0])
    assert evidence.shape == tuple(volume.shape) == (16, 16, frames)
    assert np.allclose(evidence.affine, volume.affine.numpy(), atol=1e-4)
    captures = [pydicom.dcmread(tmp_path / "out" / p) for p in record["outputs"]["sc"]]
    assert sorted(sc.SourceImageSequence[0].ReferencedFrameNumber for sc in captures) == list(range(1, frames + 1))
    assert {sc.StudyInstanceUID for sc in captures} == {source.StudyInstanceUID}
    pm_path = tmp_path / "out" / record["outputs"]["pm"][0]
    pm = pydicom.dcmread(pm_path)
    stored = np.frombuffer(pm.FloatPixelData, dtype=np.float32).reshape(frames, pm.Rows, pm.Columns)
    values = evidence.get_fdata().astype(np.float32)
    slices = transforms.dicom.frame_slices(source, evidence.affine)
    assert np.array_equal(stored, np.stack([values[..., s].T for s in slices]))  # frame f holds the map at frame f's plane
    (sr_path,) = [tmp_path / "out" / p for p in record["outputs"]["sr"]]
    (group,) = hd.sr.srread(sr_path).content.get_image_measurement_groups()
    assert [(r.referenced_sop_instance_uid, r.referenced_frame_numbers) for r in group.source_images] == [
        (source.SOPInstanceUID, None)]  # the whole volume
    for path in [pm_path, sr_path, *[tmp_path / "out" / p for p in record["outputs"]["sc"]]]:
        assert dicom_validation_errors(path) == [], path


def test_all_classes_writes_a_map_and_capture_per_class(tmp_path):
    from pydicom.data import get_testdata_file

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ct.dcm").write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read())
    ckpt = _checkpoint(tmp_path / "model.pt", 2)
    result = _infer(folder, tmp_path / "out", ckpt, "--all_classes", "true")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())[0]
    assert sorted(os.path.basename(p) for p in record["outputs"]["nifti"]) == ["ct_class0_evidence.nii.gz",
                                                                              "ct_class1_evidence.nii.gz"]
    assert len(record["outputs"]["sc"]) == 2 and len(record["outputs"]["pm"]) == 2
    uids = {pydicom.dcmread(tmp_path / "out" / p).SOPInstanceUID for p in record["outputs"]["sc"]}
    assert len(uids) == 2


def test_loader_workers_started_by_forkserver_map_evidence_back(tmp_path):
    """Workers that are not forked (forkserver: Linux from Python 3.14; spawn) pickle the preprocessing:
    the evidence must still be inverted onto the source grid, not fail every input."""
    script = f"""
import sys, torch, torch.multiprocessing as mp
sys.path.insert(0, {str(ROOT)!r})
if __name__ == "__main__":
    mp.set_start_method("forkserver", force=True)
    from monai.bundle import ConfigWorkflow
    from bundle.synthetic import make_dataset
    from bundle.networks import classifier
    make_dataset({str(tmp_path / 'data')!r}, dims=2, n=3, seed=1, size=64)
    torch.save(classifier("resnet18", backbone_kwargs={{"widen_factor": 0.125}}).state_dict(), {str(tmp_path / 'm.pt')!r})
    workflow = ConfigWorkflow(config_file={str(ROOT / 'configs/inference.json')!r},
        meta_file={str(ROOT / 'configs/metadata.json')!r}, workflow_type="infer", bundle_root={str(ROOT)!r},
        input_dir={str(tmp_path / 'data' / 'images')!r},
        output_dir={str(tmp_path / 'out')!r}, ckpt_path={str(tmp_path / 'm.pt')!r}, inference_tracking=None,
        backbone_kwargs={{"widen_factor": 0.125}}, image_size=32, num_workers=1)
    workflow.initialize()
    results, failures = workflow.parser.get_parsed_content("inference").run()
    print("processed", len(results), "failed", len(failures))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "processed 3 failed 0" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


def test_writers_are_chosen_in_the_config_and_later_ones_see_what_earlier_ones_wrote(tmp_path):
    """Writers are config ids: this run lists the Secondary Capture and Parametric Map writers and a plug-in
    from outside the bundle (tests/plugin_writers.py), and leaves the NIfTI and PNG writers out."""
    from pydicom.data import get_testdata_file

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ct.dcm").write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read())
    ckpt = _checkpoint(tmp_path / "model.pt", 2)
    writers = "['@secondary_capture_writer', '@parametric_map_writer', {'_target_': 'tests.plugin_writers.ReferenceListWriter'}]"
    result = _infer(folder, tmp_path / "out", ckpt, "--writers", writers, "--inference_tracking", "$None")
    assert result.returncode == 0, result.stderr[-2000:]
    (record,) = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sorted(record["outputs"]) == ["pm", "references", "sc"]
    assert not (tmp_path / "out" / "maps").exists() and not (tmp_path / "out" / "overlays").exists()
    listing = json.loads((tmp_path / "out" / record["outputs"]["references"][0]).read_text())
    assert listing["sources"] == [pydicom.dcmread(folder / "ct.dcm").SOPInstanceUID]
    for entry in listing["objects"]:
        written = pydicom.dcmread(tmp_path / "out" / entry["path"])
        assert (entry["sop_class_uid"], entry["sop_instance_uid"], entry["series_instance_uid"]) == (
            written.SOPClassUID, written.SOPInstanceUID, written.SeriesInstanceUID)
    assert sorted(e["kind"] for e in listing["objects"]) == ["pm", "sc"]


def test_contrast_evidence_maps_of_two_classes_are_each_others_negative(tmp_path):
    """``--evidence_map contrast`` writes E_k minus the other class's map: for two classes the maps of
    class 0 and class 1 are each other's negative, on the input's grid as in the network's."""
    from pydicom.data import get_testdata_file

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ct.dcm").write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read())
    ckpt = _checkpoint(tmp_path / "model.pt", 2)
    result = _infer(folder, tmp_path / "out", ckpt, "--all_classes", "true", "--evidence_map", "contrast",
                    "--writers", "$[@nifti_map_writer]")
    assert result.returncode == 0, result.stderr[-2000:]
    maps = [np.asarray(nib.load(tmp_path / "out" / "maps" / f"ct_class{k}_evidence.nii.gz").dataobj) for k in (0, 1)]
    assert np.abs(maps[0]).max() > 0
    np.testing.assert_allclose(maps[0], -maps[1], atol=1e-5 * np.abs(maps[0]).max())
    bad = _infer(folder, tmp_path / "bad", ckpt, "--evidence_map", "softmax")
    assert bad.returncode != 0 and "evidence_map must be one of ('raw', 'contrast'), got 'softmax'" in bad.stderr
