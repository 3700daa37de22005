"""The explanation comparison runs end to end through ``monai.bundle`` and writes one table."""

import csv
import os

import mlflow
import pytest
import torch

from bundle.networks import classifier
from bundle.networks.sigmoid_branch import SigmoidBranchClassifier
from tests.conftest import run_bundle

OPTIONS = {"backbone": "resnet18", "backbone_kwargs": {"widen_factor": 0.125}}
TINY = ["--image_size", "32", "--batch_size", "8", "--backbone_kwargs", "{'widen_factor': 0.125}"]


def _save(net, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


@pytest.fixture(scope="module")
def comparison(dataset_2d, tmp_path_factory):
    """Untrained tiny models stand in for trained ones: the comparison's mechanics do not depend on training.
    The sparse SoftCAM checkpoint is missing on purpose."""
    tmp = tmp_path_factory.mktemp("compare")
    torch.manual_seed(0)
    black_box, softcam = classifier(head="linear", **OPTIONS), classifier(head="softcam", **OPTIONS)
    _save(black_box, tmp / "models" / "linear" / "model.pt")
    _save(SigmoidBranchClassifier.from_classifier(black_box), tmp / "models" / "linear-sigmoid-branch" / "model.pt")
    _save(softcam, tmp / "models" / "softcam" / "model.pt")
    _save(SigmoidBranchClassifier.from_classifier(softcam), tmp / "models" / "softcam-sigmoid-branch" / "model.pt")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = run_bundle("--config_file", "['configs/train.json','configs/compare.json']", "--dataset_dir", str(dataset_2d),
                        "--output_dir", str(tmp / "eval"), "--models_dir", str(tmp / "models"), *TINY, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp / "eval" / "comparison" / "comparison.csv") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    return tmp, rows


def test_every_contender_with_a_checkpoint_gets_a_row(comparison):
    _, rows = comparison
    assert len(rows) == 8 + 6 + 2  # post-hoc on the black box, CAM variants on the dual branch, two SoftCAM rows
    assert "sparse SoftCAM" not in rows  # its checkpoint is missing: left out, not an error
    assert {"black box + Score-CAM", "black box + dual branch + Grad-CAM++", "dense SoftCAM",
            "SoftCAM + sigmoid branch"} <= set(rows)
    for row in rows.values():
        assert 0.0 <= float(row["accuracy"]) <= 1.0 and 0.0 <= float(row["activation_precision"]) <= 1.0


def test_the_dual_branch_keeps_the_black_boxs_classification(comparison):
    _, rows = comparison
    for column in ("accuracy", "balanced_accuracy", "auc", "kappa"):
        assert rows["black box + dual branch + CAM"][column] == rows["black box + CAM"][column]


def test_xgradcam_equals_gradcam_for_global_average_pooling(comparison):
    _, rows = comparison  # methods.md: gradients of GAP + linear are spatially constant, so the maps are equal
    xgrad, grad = rows["black box + XGrad-CAM"], rows["black box + Grad-CAM"]
    columns = [c for c in grad if c not in ("method", "seconds_per_image", "raw_map_shape")]
    assert grad["average_drop"] not in ("", "nan")  # defined on every test image
    for column in columns:  # NaN where both are undefined; patch ranks may break float ties differently
        assert float(xgrad[column]) == pytest.approx(float(grad[column]), abs=2e-3, nan_ok=True), column


def test_the_table_plots_and_grid_are_written_and_tracked(comparison):
    tmp, rows = comparison
    folder = tmp / "eval" / "comparison"
    markdown = (folder / "comparison.md").read_text().splitlines()
    assert len(markdown) == 2 + len(rows) and markdown[0].startswith("| method | Acc")
    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'eval' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("softcam").experiment_id])[0]
    assert run.info.run_name.startswith("comparison-")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "comparison.csv", "comparison.md", "deletion_curves.png", "method_grid.png"}
    assert run.data.metrics["auc.dense_SoftCAM"] == pytest.approx(float(rows["dense SoftCAM"]["auc"]), abs=1e-4)
