"""An inference run killed mid-way (SIGKILL, as by a pre-empted node or the OOM killer) and the same command
again: nothing partial under a final name, the rerun does only the inputs the first run had not finished,
and the tables are complete, without duplicate outputs."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import pydicom
import torch
from PIL import Image

from bundle.networks import classifier
from bundle.synthetic import make_dataset
from tests.conftest import ROOT

INPUTS = 200
KILL_AFTER = 40  # completed inputs


def _command(input_dir, out, ckpt):
    return [sys.executable, "-m", "monai.bundle", "run", "--meta_file", "configs/metadata.json", "--logging_file",
            "configs/logging.conf", "--config_file", "configs/inference.json", "--input_dir", str(input_dir),
            "--output_dir", str(out), "--ckpt_path", str(ckpt), "--backbone", "resnet10", "--backbone_kwargs",
            "{'widen_factor': 0.125}", "--image_size", "32", "--inference_tracking", "$None"]


def _whole(path):
    """Read a final-named output completely: raises if it is truncated or half-written."""
    if path.suffix == ".dcm":
        ds = pydicom.dcmread(path)
        ds.ContentSequence if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34" else ds.pixel_array  # an SR: no pixels
    elif path.name.endswith(".nii.gz"):
        nib.load(path).get_fdata()
    elif path.suffix == ".png":
        Image.open(path).load()
    elif path.suffix == ".json":
        json.loads(path.read_text())


def test_a_killed_run_is_resumed_with_only_the_inputs_it_had_not_finished(tmp_path):
    make_dataset(tmp_path / "data", dims=2, n=INPUTS, seed=5, size=32)
    input_dir, out = tmp_path / "data" / "images", tmp_path / "out"
    torch.manual_seed(0)
    torch.save(classifier("resnet10", backbone_kwargs={"widen_factor": 0.125}).state_dict(), tmp_path / "model.pt")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    records = out / ".completed"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(_command(input_dir, out, tmp_path / "model.pt"), cwd=ROOT, stdout=log,
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 600
        while first.poll() is None and time.monotonic() < deadline:
            if records.is_dir() and len(list(records.glob("*.json"))) >= KILL_AFTER:
                os.killpg(first.pid, signal.SIGKILL)  # the run and its DataLoader workers, mid-way
                break
            time.sleep(0.05)
        first.wait()
    assert first.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    done = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert KILL_AFTER <= len(done) < INPUTS
    for path in out.rglob("*"):
        if path.is_file() and not path.name.endswith(".part"):
            _whole(path)  # a file under its final name is whole
    finished = {name: (out / name).stat().st_mtime_ns for record in records.glob("*.json")
                for names in json.loads(record.read_text())["outputs"].values() for name in names}
    # what a kill during a write leaves (the kill above may or may not have hit one)
    (out / "dicom" / "secondary_capture" / ".1.2.3.dcm.x8f2k1.part").write_bytes(b"half a file")
    partial = len(list(out.rglob("*.part")))

    again = subprocess.run(_command(input_dir, out, tmp_path / "model.pt"), cwd=ROOT, capture_output=True, text=True,
                           env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{INPUTS} inputs, 0 unusable files in the input folder; {len(done)} done by an earlier run (skipped)" \
        in again.stdout
    assert f"removed {partial} partial files an interrupted run left" in again.stdout
    # the finished inputs were not done again: their records and outputs are the ones the first run wrote
    assert {name: (records / name).stat().st_mtime_ns for name in done} == done
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished
    assert len(list(records.glob("*.json"))) == INPUTS
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["input"] for r in rows) == sorted(str(p) for p in input_dir.glob("*.dcm"))
    for folder in ("maps", "overlays", "dicom/secondary_capture"):  # one output each, no duplicates
        assert len(list((out / folder).iterdir())) == INPUTS, folder
    assert not list(out.rglob("*.part"))
    predictions = json.loads((out / "predictions.json").read_text())
    assert sorted(len(p["outputs"]["sc"]) for p in predictions) == [1] * INPUTS
