"""The bundle's workflows run end to end through ``monai.bundle`` on tiny generated data."""

import json
import os
import sqlite3

import mlflow
import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigWorkflow

from bundle.checkpoints import load_checkpoint, network_for_checkpoint, read_description
from bundle.data import datalist_digest, label_counts, load_datalist
from bundle.tracking import image_steps
from tests.conftest import ROOT, run_bundle

TINY = ["--image_size", "64", "--batch_size", "4", "--backbone_kwargs", "{'widen_factor': 0.25}"]


def _runs(output_dir):
    client = mlflow.MlflowClient(f"sqlite:///{output_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("softcam")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_train_config_has_every_property_monai_requires(dataset_2d, tmp_path):
    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs/train.json"), meta_file=str(ROOT / "configs/metadata.json"),
        workflow_type="train", bundle_root=str(ROOT), dataset_dir=str(dataset_2d),
        output_dir=str(tmp_path), ckpt_dir=str(tmp_path / "models"),
    )
    workflow.initialize()
    assert not workflow.check_properties()


@pytest.fixture(scope="module")
def trained_softcam(dataset_2d, tmp_path_factory):
    """Train SoftCAM for two epochs, then evaluate its best checkpoint on the test split."""
    out = tmp_path_factory.mktemp("softcam_run")
    common = ["--dataset_dir", str(dataset_2d), "--output_dir", str(out / "eval"), "--ckpt_dir", str(out / "models"), *TINY]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    train = run_bundle("--config_file", "configs/train.json", "--max_epochs", "2", "--lambda1", "1e-4", *common, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    evaluate = run_bundle("--config_file", "['configs/train.json','configs/evaluate.json']", *common, env=env)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    return out, train, evaluate


def test_training_writes_the_best_checkpoint_with_its_description(trained_softcam, dataset_2d):
    out, _, _ = trained_softcam
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert "head.class_evidence_layer.weight" in state["model"]
    description = state["description"]
    assert description["network"] == {"backbone": "resnet18", "spatial_dims": 2, "in_channels": 1, "num_classes": 2,
                                      "head": "softcam", "backbone_kwargs": {"widen_factor": 0.25}, "output_stride": None}
    assert description["preprocessing"] == {"image_size": 64, "window": None}
    assert description["class_names"] == {"0": "no lesion", "1": "lesion"}
    assert description["model_name"] == "resnet18-softcam"
    assert description["bundle_version"] == json.loads((ROOT / "configs/metadata.json").read_text())["version"]
    datalist = load_datalist(dataset_2d, num_classes=2)
    assert description["datalist_digest"] == datalist_digest(datalist, dataset_2d)


def test_the_best_checkpoint_is_a_registered_mlflow_model_and_the_datalist_an_input(trained_softcam, dataset_2d):
    out, _, _ = trained_softcam
    client, runs = _runs(out / "eval")
    train_run = runs[0]
    champion = client.get_model_version_by_alias("resnet18-softcam", "champion")
    assert champion.run_id == train_run.info.run_id
    best_auc = max(m.value for m in client.get_metric_history(train_run.info.run_id, "auc"))
    assert float(champion.tags["validation_auc"]) == pytest.approx(best_auc)
    logged = client.get_logged_model(champion.source.removeprefix("models:/"))  # filed with the training's run
    assert logged.experiment_id == train_run.info.experiment_id
    assert logged.artifact_location.startswith((out / "eval" / "mlruns").as_uri())
    (dataset_input,) = train_run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.digest == torch.load(out / "models" / "model.pt", weights_only=True)["description"]["datalist_digest"]
    assert {t.key: t.value for t in dataset_input.tags} == {"mlflow.data.context": "training"}
    datalist = load_datalist(dataset_2d, num_classes=2)
    assert json.loads(dataset.profile)["num_rows"] == len(label_counts(datalist))
    assert str(dataset_2d) not in dataset.source + dataset.schema and "case_" not in dataset.source  # no path, no file
    # the registered model gives the checkpoint's probabilities and evidence maps
    mlflow.set_tracking_uri(f"sqlite:///{out / 'eval' / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model("models:/resnet18-softcam@champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert [tuple(spec.shape) for spec in model.metadata.signature.inputs.inputs] == [(-1, 1, 64, 64)]
    images = np.random.default_rng(0).random((3, 1, 64, 64), dtype=np.float32)
    predicted = model.predict(images)
    network = network_for_checkpoint(out / "models" / "model.pt")
    load_checkpoint(network, out / "models" / "model.pt")
    with torch.no_grad():
        logits, maps = network.eval().forward_with_maps(torch.from_numpy(images))
    assert np.array_equal(predicted["probabilities"], logits.softmax(1).numpy())
    assert np.array_equal(predicted["evidence_maps"], maps.numpy())


def test_training_is_tracked_in_mlflow(trained_softcam):
    out, _, _ = trained_softcam
    client, runs = _runs(out / "eval")
    train_run = runs[0]
    assert train_run.info.status == "FINISHED"
    assert train_run.data.params["head"] == "softcam" and train_run.data.params["lambda1"] == "0.0001"
    assert len(client.get_metric_history(train_run.info.run_id, "train_loss")) == 2 * 4  # 16 images / batch 4, 2 epochs
    assert len(client.get_metric_history(train_run.info.run_id, "auc")) == 2
    assert len(client.get_metric_history(train_run.info.run_id, "accuracy")) == 2
    artifacts = {a.path for a in client.list_artifacts(train_run.info.run_id)}
    assert {"model.pt", "train.json", "metadata.json"} <= artifacts
    gallery = [a.path for a in client.list_artifacts(train_run.info.run_id, "images") if a.path.endswith(".png")]
    assert sorted(path.split("+")[:3] for path in gallery) == [  # an MLflow image per epoch, the epoch its step
        ["images/evidence_gallery", "step", "1"], ["images/evidence_gallery", "step", "2"]]


def test_evaluation_scores_the_test_split_and_is_tracked(trained_softcam, dataset_2d):
    out, _, _ = trained_softcam
    metrics = dict(line.split(",") for line in (out / "eval/resnet18-softcam/test/metrics.csv").read_text().split())
    assert 0.0 <= float(metrics["auc"]) <= 1.0 and 0.0 <= float(metrics["accuracy"]) <= 1.0
    client, runs = _runs(out / "eval")
    test_run = runs[-1]
    assert "-test-" in test_run.info.run_name
    n_test = len(json.loads((dataset_2d / "datalist.json").read_text())["test"])
    assert test_run.data.params["n_test"] == str(n_test)
    assert test_run.data.metrics["auc"] == pytest.approx(float(metrics["auc"]))


def test_no_patient_identifier_reaches_mlflow_or_the_logs(trained_softcam, dataset_2d):
    out, train, evaluate = trained_softcam
    identifiers = set()
    for path in (dataset_2d / "images").glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        identifiers |= {str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber,
                        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    stored = [(out / "eval" / "mlflow.db").read_bytes()]
    stored += [p.read_bytes() for p in (out / "eval").rglob("*") if p.is_file() and p.suffix != ".db"]
    with sqlite3.connect(out / "eval" / "mlflow.db") as db:
        stored += [repr(db.execute(f"select * from {t}").fetchall()).encode() for t in ("params", "tags", "metrics")]
    logs = (train.stdout + train.stderr + evaluate.stdout + evaluate.stderr).encode()
    for identifier in identifiers:
        assert not any(identifier.encode() in blob for blob in stored + [logs]), identifier


def test_black_box_baseline_by_one_switch_and_tracking_uri_from_the_environment(dataset_2d, tmp_path):
    store = tmp_path / "elsewhere.db"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    result = run_bundle("--config_file", "configs/train.json", "--head", "linear", "--max_epochs", "1",
                        "--dataset_dir", str(dataset_2d), "--output_dir", str(tmp_path / "eval"),
                        "--ckpt_dir", str(tmp_path / "models"), *TINY, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)["model"]
    assert "head.fc.weight" in state
    assert store.exists() and not (tmp_path / "eval" / "mlflow.db").exists()
    run = mlflow.MlflowClient(f"sqlite:///{store}").search_runs(
        [mlflow.MlflowClient(f"sqlite:///{store}").get_experiment_by_name("softcam").experiment_id])[0]
    assert run.data.params["head"] == "linear"


def test_3d_softcam_trains_on_nifti_volumes(dataset_3d, tmp_path):
    result = run_bundle("--config_file", "configs/train.json", "--spatial_dims", "3", "--image_size", "32",
                        "--max_epochs", "1", "--batch_size", "2", "--backbone_kwargs", "{'widen_factor': 0.25}",
                        "--dataset_dir", str(dataset_3d), "--output_dir", str(tmp_path / "eval"),
                        "--ckpt_dir", str(tmp_path / "models"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").exists()
    assert len(list((tmp_path / "eval" / "resnet18-softcam").glob("*/gallery/epoch_001.png"))) == 1


def test_monai_tracking_flag_logs_one_complete_run_without_duplicates(dataset_2d, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = run_bundle("--config_file", "configs/train.json", "--tracking", "mlflow", "--max_epochs", "1",
                        "--dataset_dir", str(dataset_2d), "--output_dir", str(tmp_path / "eval"),
                        "--ckpt_dir", str(tmp_path / "models"), *TINY, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    client, runs = _runs(tmp_path / "eval")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["head"] == "softcam"  # our handler still logs the hyperparameters
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 4  # 16 images, batch 4: no duplicates
    assert len(client.get_metric_history(run.info.run_id, "auc")) == 1
    assert image_steps(client, run.info.run_id, "evidence_gallery") == [1]


def test_the_sigmoid_branch_trains_on_a_frozen_baseline_and_is_tracked(dataset_2d, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    common = ["--head", "linear", "--dataset_dir", str(dataset_2d), "--output_dir", str(tmp_path / "eval"), *TINY]
    baseline = run_bundle("--config_file", "configs/train.json", "--max_epochs", "1",
                          "--ckpt_dir", str(tmp_path / "baseline"), *common, env=env)
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    # the baseline checkpoint alone says the network, its head and the image size
    branch = run_bundle("--config_file", "['configs/train.json','configs/train_sigmoid_branch.json']", "--max_epochs", "2",
                        "--baseline_ckpt", str(tmp_path / "baseline" / "model.pt"), "--ckpt_dir", str(tmp_path / "branch"),
                        "--dataset_dir", str(dataset_2d), "--output_dir", str(tmp_path / "eval"), "--batch_size", "4",
                        env=env)
    assert branch.returncode == 0, branch.stderr[-3000:]
    before = torch.load(tmp_path / "baseline" / "model.pt", map_location="cpu", weights_only=True)["model"]
    after = torch.load(tmp_path / "branch" / "model.pt", map_location="cpu", weights_only=True)["model"]
    assert set(after) == set(before) | {"branch.fc.weight", "branch.fc.bias"}
    assert all(torch.equal(before[k], after[k]) for k in before)  # backbone, head and BatchNorm statistics untouched
    assert not torch.equal(after["branch.fc.weight"], before["head.fc.weight"])
    description = read_description(tmp_path / "branch" / "model.pt")
    assert description["sigmoid_branch"] and description["network"]["head"] == "linear"
    assert description["preprocessing"]["image_size"] == 64
    client, runs = _runs(tmp_path / "eval")
    run = runs[-1]
    assert run.info.run_name.startswith("resnet18-linear-sigmoid-branch-")
    assert run.data.params["optimizer"] == "SGD" and run.data.params["baseline_checkpoint"] == "model.pt"
    assert len(client.get_metric_history(run.info.run_id, "auc")) == 2


def test_training_twice_with_the_same_seed_gives_the_same_weights(dataset_2d, tmp_path):
    # one data-loading worker, so its seeding is exercised too; a dilated backbone (output_stride 8)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    states = []
    for run in ("first", "second"):
        result = run_bundle("--config_file", "configs/train.json", "--max_epochs", "1", "--lambda1", "1e-2",
                            "--output_stride", "8", "--num_workers", "1", "--dataset_dir", str(dataset_2d),
                            "--output_dir", str(tmp_path / run), "--ckpt_dir", str(tmp_path / run / "models"), *TINY, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        states.append(torch.load(tmp_path / run / "models" / "model.pt", map_location="cpu", weights_only=True))
        _, runs = _runs(tmp_path / run)
        assert runs[0].data.params["output_stride"] == "8" and runs[0].data.params["deterministic"] == "True"
    weights = [state["model"] for state in states]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert states[0]["description"] == states[1]["description"]
