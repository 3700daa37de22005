"""Sources as they come from the field: values that do not conform to their VR, invalid UIDs, files without a
preamble. Every output is still written and valid, what was dropped or repaired is reported by attribute
name, and no patient's data appears in stdout, stderr, the tables or the MLflow store."""

import csv
import json
import os

import numpy as np
import pydicom
import pytest
import torch
from pydicom import config
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from bundle.data import load_datalist
from bundle.inputs import discover_inputs
from bundle.networks import classifier
from tests.conftest import dicom_validation_errors, run_bundle
from tests.dicom_matrix import without_preamble

INVALID_STUDY_UID = "1.2.840.99999.abc.7"
PATIENTS = {  # file -> identifying values it carries, none of which may leave the DICOM outputs
    "odd_values.dcm": {"PatientName": "Zyxwvut", "PatientID": "PID-8675309-QX", "PatientBirthDate": "19450317",
                       "AccessionNumber": "ACC5551212LONGVAL", "ReferringPhysicianName": "Q" * 70},
    "invalid_uids.dcm": {"PatientName": "Hjklmnb", "PatientID": "PID-2468013-ZW", "PatientBirthDate": "19511224",
                         "AccessionNumber": "ACC24680"},
    "no_preamble.dcm": {"PatientName": "Qwertyuiop", "PatientID": "PID-1357913-YV", "PatientBirthDate": "19600229",
                        "AccessionNumber": "ACC13579"},
    "rgb_ultrasound.dcm": {"PatientName": "Plmoknijb", "PatientID": "PID-9753197-XU", "PatientBirthDate": "19720808",
                           "AccessionNumber": "ACC97531"},
}


def _source(name: str, testdata: str, **values) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file(testdata))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, generate_uid(entropy_srcs=[name, keyword]))
    for keyword, value in {**PATIENTS[name], **values}.items():
        setattr(ds, keyword, value)
    return ds


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("field_sources")
    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE  # write what some modalities write
    try:
        _source("odd_values.dcm", "CT_small.dcm", StudyTime="11:20:00", StudyDate="2020-01-02", PixelSpacing=[0, 0]
                ).save_as(root / "odd_values.dcm")
        _source("invalid_uids.dcm", "CT_small.dcm", StudyInstanceUID=INVALID_STUDY_UID, SOPInstanceUID="1.2.840.0099.5.6"
                ).save_as(root / "invalid_uids.dcm")
        (root / "no_preamble.dcm").write_bytes(without_preamble(_source("no_preamble.dcm", "MR_small.dcm")))
        _source("rgb_ultrasound.dcm", "examples_rgb_color.dcm").save_as(root / "rgb_ultrasound.dcm")
    finally:
        config.settings.writing_validation_mode = mode
    return root


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("field_run") / "out"
    torch.manual_seed(0)
    ckpt = out.parent / "model.pt"
    torch.save(classifier("resnet10", backbone_kwargs={"widen_factor": 0.125}).state_dict(), ckpt)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = run_bundle("--config_file", "configs/inference.json", "--input_dir", str(folder), "--output_dir", str(out),
                        "--ckpt_path", str(ckpt), "--backbone", "resnet10", "--backbone_kwargs", "{'widen_factor': 0.125}",
                        "--image_size", "32", env=env)
    with open(out / "predictions.csv") as f:
        rows = {os.path.basename(r["input"]): r for r in csv.DictReader(f)}
    records = {os.path.basename(r["input"]): r for r in json.loads((out / "predictions.json").read_text())}
    return out, result, rows, records


def test_every_source_yields_valid_outputs(run):
    out, result, rows, records = run
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert set(rows) == set(PATIENTS)
    assert all(len(records[name]["outputs"]["sc"]) == 1 for name in PATIENTS)
    # a Parametric Map where the source has a plane: not where its PixelSpacing was 0\0 (dropped) or it has none (US)
    assert sorted(name for name in PATIENTS if "pm" in records[name]["outputs"]) == ["invalid_uids.dcm", "no_preamble.dcm"]
    for path in (out / "dicom").rglob("*.dcm"):
        assert dicom_validation_errors(path) == [], path


def test_non_conformant_values_are_repaired_or_dropped_and_named_once(run):
    out, result, rows, records = run
    sc = pydicom.dcmread(out / records["odd_values.dcm"]["outputs"]["sc"][0])
    assert (sc.StudyTime, sc.StudyDate) == ("112000", "20200102")  # the ACR-NEMA forms, without separators
    assert "PixelSpacing" not in sc and not sc.AccessionNumber and not sc.ReferringPhysicianName
    assert (str(sc.PatientName), sc.PatientID) == ("Zyxwvut", "PID-8675309-QX")  # the patient is kept
    notes = rows["odd_values.dcm"]["notes"]
    for change in ("StudyTime (TM) repaired", "StudyDate (DA) repaired", "PixelSpacing (DS) dropped",
                   "AccessionNumber (SH) dropped", "ReferringPhysicianName (PN) dropped"):
        assert change in notes
        assert result.stdout.count(f"source attribute {change}") == 1  # one log line per attribute and run
    assert rows["rgb_ultrasound.dcm"]["notes"] == ""


def test_an_invalid_study_uid_files_the_outputs_in_a_derived_study_and_says_so(run, folder):
    """Decision (bundle/writers/conformance.py): an invalid Study Instance UID cannot be copied into a valid
    object, so the outputs go into a study whose UID is derived from it, the same for every output and run;
    the input's notes and the log say so, for a PACS administrator to file them by hand."""
    out, result, rows, records = run
    derived = generate_uid(entropy_srcs=["non-conformant UID", INVALID_STUDY_UID])
    outputs = [pydicom.dcmread(out / name) for kind in ("sc", "pm") for name in records["invalid_uids.dcm"]["outputs"][kind]]
    assert {ds.StudyInstanceUID for ds in outputs} == {derived}
    assert {(str(ds.PatientName), ds.PatientID) for ds in outputs} == {("Hjklmnb", "PID-2468013-ZW")}
    assert "StudyInstanceUID (UI) replaced by a derived UID: not a valid UID; the outputs go into a new study" \
        in rows["invalid_uids.dcm"]["notes"]
    assert "source attribute StudyInstanceUID (UI) replaced" in result.stdout


def test_a_file_without_preamble_is_read_by_discovery_the_datalist_check_and_the_reader(run, folder):
    out, _, rows, records = run
    raw = (folder / "no_preamble.dcm").read_bytes()
    assert raw[128:132] != b"DICM" and not pydicom.misc.is_dicom(folder / "no_preamble.dcm")
    inputs, failures = discover_inputs(folder, 2)
    assert "no_preamble.dcm" in {i.files[0].name for i in inputs} and failures == []
    (folder.parent / "datalist.json").write_text(json.dumps({"test": [{"image": f"{folder.name}/no_preamble.dcm",
                                                                        "label": 0}]}))
    assert load_datalist(folder.parent)["test"][0]["image"].endswith("no_preamble.dcm")
    pm = pydicom.dcmread(out / records["no_preamble.dcm"]["outputs"]["pm"][0])
    source = pydicom.dcmread(folder / "no_preamble.dcm", force=True)
    stored = np.frombuffer(pm.FloatPixelData, dtype=np.float32)
    assert (pm.Rows, pm.Columns) == (source.Rows, source.Columns) and np.isfinite(stored).all()
    assert rows["no_preamble.dcm"]["notes"] == ""


def test_no_patient_data_in_logs_tables_or_the_mlflow_store(run, folder):
    out, result, _, _ = run
    identifiers = {value for values in PATIENTS.values() for value in values.values()}
    for path in folder.iterdir():  # and every UID of every source, valid or not
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        identifiers |= {str(ds[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                                    "FrameOfReferenceUID") if k in ds}
    texts = {"stdout": result.stdout, "stderr": result.stderr}
    # every file the run wrote except the DICOM outputs, which carry the patient by design
    for path in out.rglob("*"):
        if path.is_file() and "dicom" not in path.relative_to(out).parts:
            texts[str(path)] = path.read_bytes().decode("latin-1")
    assert any("mlflow.db" in name for name in texts) and any("mlruns" in name for name in texts)
    leaks = {(name, identifier) for name, text in texts.items() for identifier in identifiers if identifier in text}
    assert leaks == set()
    assert "<withheld>" in result.stdout + result.stderr  # the libraries did warn about these sources' values
