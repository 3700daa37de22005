"""Multi-process inference (torchrun, gloo on the CPU) against a single-process run over the same folder:
each process a shard of the inputs, one merged set of tables, one MLflow run."""

import csv
import json
import os
import re
import subprocess
import sys

import mlflow
import pytest
import torch

from bundle.networks import classifier
from tests.conftest import ROOT, run_bundle

MODEL = ["--backbone", "resnet10", "--backbone_kwargs", "{'widen_factor': 0.125}", "--image_size", "32",
         "--num_workers", "0", "--writer_processes", "1"]
MULTI_CONFIG = "['configs/inference.json','configs/multi_gpu_inference.json']"


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _outputs(out):
    """Every file the run wrote per input (maps, overlays, DICOM), relative to ``out``."""
    return sorted(str(p.relative_to(out)) for kind in ("maps", "overlays", "dicom") for p in (out / kind).rglob("*")
                  if p.is_file())


def _torchrun(input_dir, out, ckpt, env):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "monai.bundle", "run", "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
               "--config_file", MULTI_CONFIG, "--input_dir", str(input_dir), "--output_dir", str(out),
               "--ckpt_path", str(ckpt), *MODEL]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def _env():
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")  # an abort prints every thread's stack
    return env


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("multi_gpu_inference_model") / "model.pt"
    torch.manual_seed(0)
    torch.save(classifier("resnet10", backbone_kwargs={"widen_factor": 0.125}).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def runs(mixed_folder, checkpoint, tmp_path_factory):
    """The same folder and checkpoint through one process and through two (torchrun, gloo)."""
    tmp = tmp_path_factory.mktemp("multi_gpu_inference")
    single = run_bundle("--config_file", "configs/inference.json", "--input_dir", str(mixed_folder), "--output_dir",
                        str(tmp / "single"), "--ckpt_path", str(checkpoint), *MODEL, env=_env())
    multi = _torchrun(mixed_folder, tmp / "multi", checkpoint, _env())
    return tmp / "single", single, tmp / "multi", multi


def test_failed_inputs_end_the_processes_with_status_2(runs):
    _, single, _, multi = runs
    assert single.returncode == 2, single.stderr[-3000:]
    # torchrun itself exits 1 whenever a process fails; as soon as one ends with status 2 it stops the
    # others (SIGTERM, -15) that have not ended yet, and its report lists each process's exit code. Each
    # process leaves the process group before it raises: gloo's threads outliving the interpreter made
    # a process abort (-6) instead of ending with status 2
    assert multi.returncode == 1, multi.stderr[-3000:]
    report = multi.stderr[multi.stderr.index("Failures:"):]
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", report)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, report[-3000:]
    # process 0 alone prints the totals, and they are the single process's
    message = re.search(r"\d+ of \d+ inputs could not be processed", single.stderr).group(0)
    assert multi.stderr.count(message) == 1, multi.stderr[-3000:]


def test_a_folder_without_bad_inputs_ends_every_process_with_status_0(mixed_folder, checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("CT_small.dcm", "JPEG2000.dcm", "SC_rgb_rle_2frame.dcm"):
        os.symlink(mixed_folder / name, folder / name)
    result = _torchrun(folder, tmp_path / "out", checkpoint, _env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(re.findall(r"process (\d) of 2: (\d+) of 4 inputs", result.stdout)) == [("0", "2"), ("1", "2")]
    assert len(_rows(tmp_path / "out" / "predictions.csv")) == 4 and _rows(tmp_path / "out" / "failures.csv") == []
    assert not (tmp_path / "out" / ".shards").exists()
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "dicom").rglob("*.dcm")}
    predictions = _rows(tmp_path / "out" / "predictions.csv")
    again = _torchrun(folder, tmp_path / "out", checkpoint, _env())  # the same run again: every input is done
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(re.findall(r"process (\d) of 2: (\d+) of 4 inputs \((\d+) done by an earlier run", again.stdout)) == [
        ("0", "0", "4"), ("1", "0", "4")]
    assert _rows(tmp_path / "out" / "predictions.csv") == predictions  # the tables, from the completion records
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "dicom").rglob("*.dcm")} == written


def test_each_process_takes_its_own_share_of_the_inputs(runs):
    _, single, _, multi = runs
    n_inputs = int(re.search(r"(\d+) inputs, \d+ unusable files", single.stdout).group(1))
    shares = dict(re.findall(r"process (\d) of 2: (\d+) of %d inputs" % n_inputs, multi.stdout))
    assert shares == {"0": str((n_inputs + 1) // 2), "1": str(n_inputs // 2)}, multi.stdout[-3000:]


def test_the_merged_predictions_equal_a_single_process_run(runs):
    single, _, multi, _ = runs
    expected, merged = _rows(single / "predictions.csv"), _rows(multi / "predictions.csv")
    assert len(merged) == len(expected) == 16  # mixed_folder: 16 2D inputs that load
    for got, want in zip(merged, expected):  # same inputs in the same order
        probabilities = [k for k in want if k.startswith("p_")]
        assert list(got) == list(want)
        assert [got[k] for k in got if k not in probabilities] == [want[k] for k in want if k not in probabilities]
        for k in probabilities:
            assert float(got[k]) == pytest.approx(float(want[k]), abs=1e-5)
    records = json.loads((multi / "predictions.json").read_text())
    assert [r["outputs"] for r in records] == [r["outputs"] for r in json.loads((single / "predictions.json").read_text())]


def test_the_processes_write_the_same_output_files_as_one(runs):
    single, _, multi, _ = runs
    written = _outputs(multi)
    assert written == _outputs(single)  # same names, so the same derived UIDs
    assert len([p for p in written if p.startswith("dicom/secondary_capture/")]) == 16


def test_one_failures_table_lists_every_bad_file(runs):
    single, _, multi, _ = runs
    failures = _rows(multi / "failures.csv")
    assert failures == _rows(single / "failures.csv")
    names = {os.path.basename(r["input"]) for r in failures}
    # found bad by process 0 while discovering, and found bad while loading by whichever process had it
    assert {"empty.dcm", "truncated.dcm", "no_pixels.dcm", "video.dcm", "volume.nii.gz"} <= names


def test_no_shard_or_partial_file_is_left_behind(runs):
    _, _, multi, _ = runs
    assert not (multi / ".shards").exists()
    assert not [p for p in multi.rglob("*") if p.name.endswith(".part") or re.fullmatch(r"rank\d+\.json", p.name)]
    assert sorted(p.name for p in multi.glob("*.csv")) == ["failures.csv", "predictions.csv"]


def test_one_mlflow_run_counts_the_inputs_of_every_process(runs):
    single, _, multi, _ = runs
    client = mlflow.MlflowClient(f"sqlite:///{multi / 'mlflow.db'}")
    runs_logged = client.search_runs([client.get_experiment_by_name("softcam-inference").experiment_id])
    assert len(runs_logged) == 1
    run = runs_logged[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["inputs_processed"] == len(_rows(single / "predictions.csv"))
    assert run.data.metrics["inputs_failed"] == len(_rows(single / "failures.csv"))
    overlays = {a.path for a in client.list_artifacts(run.info.run_id, "overlays")}
    assert overlays == {f"overlays/overlay_{i:03d}.png" for i in range(16)}  # gathered from both processes' results
