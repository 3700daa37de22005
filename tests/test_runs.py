"""Many runs and long runs: four trainings at once on one MLflow store (the embedded SQLite file, then
a real ``mlflow server``), and a training killed with SIGKILL and resumed."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from monai.bundle import ConfigParser

from bundle.runs import (TrainingState, complete, last_run_dir, release_training_run, start_training_run,
                         training_states, unique_stamp)
from bundle.tracking import image_steps
from tests.conftest import ROOT
from tests.mlflow_ui import mlflow_server

# tiny and single-threaded: four of these share two cores
TINY = ["--backbone", "resnet10", "--backbone_kwargs", "{'widen_factor': 0.125}", "--image_size", "32",
        "--batch_size", "4", "--num_workers", "0", "--cache", "none"]
SEEDS = (1, 2, 3, 4)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _training(dataset, out, *extra) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "--meta_file", "configs/metadata.json",
            "--logging_file", "configs/logging.conf", "--config_file", "configs/train.json",
            "--dataset_dir", str(dataset), "--output_dir", str(out / "eval"), "--models_dir", str(out / "models"),
            *TINY, *extra]


def _start(command, log) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def _four_trainings_at_once(dataset, out, *extra) -> None:
    """Start one training per seed on one output_dir, all at once, and wait for them."""
    processes = [_start(_training(dataset, out, "--seed", str(seed), "--max_epochs", "1", *extra), out / f"seed{seed}.log")
                 for seed in SEEDS]
    for seed, process in zip(SEEDS, processes):
        assert process.wait(timeout=600) == 0, (out / f"seed{seed}.log").read_text()[-4000:]


def _check_four_separate_runs(client, out) -> None:
    runs = client.search_runs([client.get_experiment_by_name("softcam").experiment_id])
    assert len(runs) == 4 and len({r.info.run_name for r in runs}) == 4
    assert sorted(r.data.params["seed"] for r in runs) == [str(s) for s in SEEDS]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4]
        assert len(client.get_metric_history(run.info.run_id, "auc")) == 1
        assert "model.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # each its own default checkpoint folder, recording its own run
    folders = sorted((out / "models" / "resnet10-softcam").iterdir())
    assert len(folders) == 4 and all((f / "model.pt").is_file() for f in folders)
    assert {json.loads((f / "run.json").read_text())["run_id"] for f in folders} == {r.info.run_id for r in runs}


def test_four_trainings_at_once_on_one_new_embedded_store(dataset_2d, tmp_path):
    _four_trainings_at_once(dataset_2d, tmp_path)
    _check_four_separate_runs(mlflow.MlflowClient(f"sqlite:///{tmp_path / 'eval' / 'mlflow.db'}"), tmp_path)


@pytest.fixture
def tracking_server(tmp_path):
    """A real ``mlflow server`` on a free loopback port: SQLite backend, artifacts stored and served by it."""
    store = tmp_path / "server"
    store.mkdir()
    with mlflow_server(store / "mlflow.db", store / "server.log", artifacts=store / "artifacts") as url:
        yield url, store


def test_four_trainings_at_once_on_a_tracking_server(dataset_2d, tmp_path, tracking_server):
    url, store = tracking_server
    _four_trainings_at_once(dataset_2d, tmp_path, "--tracking_uri", url)
    _check_four_separate_runs(mlflow.MlflowClient(url), tmp_path)
    assert not (tmp_path / "eval" / "mlflow.db").exists() and not (tmp_path / "eval" / "mlruns").exists()
    # uploaded to the server, not written locally: each run's best checkpoint, and the MLflow model made of it
    checkpoints = [p.relative_to(store / "artifacts").parts for p in (store / "artifacts").rglob("model.pt")]
    assert len([p for p in checkpoints if "models" not in p]) == len([p for p in checkpoints if "models" in p]) == 4


def _kill_after_epoch(process: subprocess.Popen, ckpt_parent, epoch: int) -> None:
    """SIGKILL ``process`` as soon as a complete state of ``epoch`` is in a folder under ``ckpt_parent``."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        states = [p for folder in ckpt_parent.glob("*/") for e, p in training_states(folder) if e == epoch]
        if states and complete(states[0]):
            break
        assert process.poll() is None, "the training ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the training ended before it could be killed"


def test_a_killed_training_resumes_into_the_same_run_and_ends_as_an_uninterrupted_one(dataset_2d, tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    four_epochs = ("--max_epochs", "4", "--seed", "7")
    uninterrupted = _start(_training(dataset_2d, whole, *four_epochs), tmp_path / "whole.log")
    first = _start(_training(dataset_2d, killed, *four_epochs), tmp_path / "first.log")
    _kill_after_epoch(first, killed / "models" / "resnet10-softcam", 2)
    resumed = subprocess.run(_training(dataset_2d, killed, *four_epochs, "--resume", "true"), cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "whole.log").read_text()[-4000:]

    log = resumed.stdout + resumed.stderr
    assert "from the end of epoch 2" in log
    assert [e for e in range(1, 5) if f"Epoch[{e}] Complete" in log.replace("SupervisedTrainer - INFO - ", "")] == [3, 4]
    (folder,) = (killed / "models" / "resnet10-softcam").iterdir()
    assert [e for e, _ in training_states(folder)] == [3, 4]  # the saver took over the files it found

    client = mlflow.MlflowClient(f"sqlite:///{killed / 'eval' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("softcam").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == json.loads((folder / "run.json").read_text())["run_id"]
    for metric in ("auc", "accuracy", "train_accuracy"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2, 3, 4], metric
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == list(range(1, 17))
    assert image_steps(client, run.info.run_id, "evidence_gallery") == [1, 2, 3, 4]  # each epoch's gallery once

    # deterministic on the CPU: the same weights, optimizer state and best model as without the interruption
    (whole_folder,) = (whole / "models" / "resnet10-softcam").iterdir()
    after_resume = torch.load(folder / "checkpoint_epoch=4.pt", weights_only=True)
    without_break = torch.load(whole_folder / "checkpoint_epoch=4.pt", weights_only=True)
    for key, value in without_break["network"].items():
        assert torch.equal(after_resume["network"][key], value), key
    for key in ("trainer", "best_validation", "best_model"):
        assert after_resume[key] == without_break[key], key
    assert torch.equal(after_resume["optimizer"]["state"][0]["exp_avg"], without_break["optimizer"]["state"][0]["exp_avg"])
    best = torch.load(folder / "model.pt", weights_only=True)
    best_without_break = torch.load(whole_folder / "model.pt", weights_only=True)
    assert all(torch.equal(v, best_without_break["model"][k]) for k, v in best["model"].items())
    assert best["description"] == best_without_break["description"]


def test_a_checkpoint_folder_serves_one_training_at_a_time_and_resumes_only_the_same_settings(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = str(tmp_path / "models" / "run")
    run_id = start_training_run(uri, "softcam", "resnet10-softcam-x", folder, {"max_epochs": 1})
    with pytest.raises(RuntimeError, match="in use by another training"):
        start_training_run(uri, "softcam", "resnet10-softcam-y", folder, {"max_epochs": 1})
    mlflow.MlflowClient(uri).log_param(run_id, "max_epochs", 1)
    release_training_run(folder)
    with pytest.raises(ValueError, match=r"max_epochs: 1 \(run\) != 3 \(now\)"):
        start_training_run(uri, "softcam", "ignored", folder, {"max_epochs": 3}, resume=True)
    release_training_run(folder)
    assert start_training_run(uri, "softcam", "ignored", folder, {"max_epochs": 1}, resume=True) == run_id
    release_training_run(folder)
    assert json.loads((tmp_path / "models" / "run" / "run.json").read_text())["run_name"] == "resnet10-softcam-x"


def test_stamps_are_unique_and_sort_by_time():
    stamps = [unique_stamp() for _ in range(1000)]
    assert len(set(stamps)) == 1000 and stamps == sorted(stamps, key=lambda s: s[:22])
    assert re.fullmatch(r"\d{8}-\d{6}-\d{6}-[0-9a-f]{4}", stamps[0])


def test_evaluation_inference_and_the_sigmoid_branch_default_to_the_newest_training_with_a_model(tmp_path):
    runs = tmp_path / "models" / "resnet18-softcam"
    for stamp, files in [("20260101-000000-000000-aaaa", ["model.pt"]), ("20260102-000000-000000-bbbb", ["model.pt"]),
                         ("20260103-000000-000000-cccc", ["run.json"])]:  # the newest one stopped before a model
        (runs / stamp).mkdir(parents=True)
        for name in files:  # an empty state dict: a checkpoint that does not describe itself
            torch.save({}, runs / stamp / name) if name == "model.pt" else (runs / stamp / name).write_bytes(b"")
    overrides = {"bundle_root": str(ROOT), "models_dir": str(tmp_path / "models")}
    evaluation = ConfigParser()
    evaluation.read_config([str(ROOT / "configs/train.json"), str(ROOT / "configs/evaluate.json")])
    evaluation.update(overrides)
    assert evaluation.get_parsed_content("ckpt_dir") == str(runs / "20260102-000000-000000-bbbb")
    branch = ConfigParser()
    branch.read_config([str(ROOT / "configs/train.json"), str(ROOT / "configs/train_sigmoid_branch.json")])
    branch.update(overrides)
    assert branch.get_parsed_content("baseline_ckpt") == str(runs / "20260102-000000-000000-bbbb" / "model.pt")
    assert branch.get_parsed_content("ckpt_dir").startswith(str(tmp_path / "models" / "resnet18-softcam-sigmoid-branch") + "/")
    training = ConfigParser()
    training.read_config(str(ROOT / "configs/train.json"))
    training.update({**overrides, "resume": True})
    assert training.get_parsed_content("ckpt_dir") == str(runs / "20260103-000000-000000-cccc")
    inference = ConfigParser()
    inference.read_config(str(ROOT / "configs/inference.json"))
    inference.update(overrides)
    assert inference.get_parsed_content("ckpt_path") == str(runs / "20260102-000000-000000-bbbb" / "model.pt")
    with pytest.raises(FileNotFoundError, match="no training run with model.pt in"):
        last_run_dir(tmp_path / "models" / "densenet121-softcam")
    inference = ConfigParser()
    inference.read_config(str(ROOT / "configs/inference.json"))
    inference.update({**overrides, "models_dir": str(tmp_path / "nothing-trained")})
    with pytest.raises(RuntimeError) as failure:  # MONAI's wrapper; the traceback prints the cause
        inference.get_parsed_content("ckpt_path")
    assert isinstance(failure.value.__cause__, FileNotFoundError)
    assert re.search(r"no training run with model.pt in .*nothing-trained.*give --ckpt_path", str(failure.value.__cause__))


def test_a_resume_without_a_saved_state_says_so(tmp_path):
    state = TrainingState(str(tmp_path), torch.nn.Linear(1, 1), None, resume=True)
    (tmp_path / "checkpoint_epoch=1.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(FileNotFoundError, match="stopped before its first epoch ended"):
        state._last_state()
    assert not (tmp_path / "checkpoint_epoch=1.pt").exists()  # the cut file is removed
