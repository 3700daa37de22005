"""The explanation comparison: its rows, which maps each column reads, its ceilings and chance,
in process on tiny models, and end to end through ``monai.bundle``."""

import csv
import math
import os

import mlflow
import pytest
import torch

from bundle.explain.compare import Contender, ExplanationComparison, default_contenders
from bundle.explain.compare import TestSet as ComparisonSet
from bundle.networks import classifier
from bundle.networks.sigmoid_branch import SigmoidBranchClassifier
from tests.conftest import run_bundle

OPTIONS = {"backbone": "resnet18", "backbone_kwargs": {"widen_factor": 0.125}}
TINY = ["--image_size", "32", "--batch_size", "8", "--backbone_kwargs", "{'widen_factor': 0.125}"]


def _save(net, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


# 32 x 32 inputs give 4 x 4 maps
NET = {"backbone": "resnet10", "num_classes": 2,
       "backbone_kwargs": {"widen_factor": 0.125, "no_max_pool": True, "conv1_t_stride": 1}}


def tiny_test_set(labels: tuple[int, ...] = (0, 1) * 4) -> ComparisonSet:
    """Images (n, 1, 32, 32); those labelled 1 have an 8 x 8 lesion aligned to one evidence cell."""
    labels = torch.tensor(labels)
    images = torch.rand(len(labels), 1, 32, 32, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(len(labels), 32, 32, dtype=torch.bool)
    masks[labels == 1, 8:16, 16:24] = True
    images[masks.unsqueeze(1)] += 1.0
    return ComparisonSet(images, labels, masks)


def compare(tmp_path, models: dict, contenders: list[Contender], test_set: ComparisonSet | None = None,
            network: dict = NET, **options) -> tuple[dict, ExplanationComparison]:
    specs = {}
    for name, (model, head, branch) in models.items():
        path = tmp_path / name / "model.pt"
        path.parent.mkdir(parents=True)
        torch.save(model.state_dict(), path)
        specs[name] = {"head": head, "checkpoint": str(path), "branch": branch}
    options = {"randomisation_images": 0, "grid_images": 2, "deletion_patch": 4, "localisation_patch": 8, **options}
    comparison = ExplanationComparison(test_set or tiny_test_set(), specs, network, str(tmp_path / "out"), contenders, **options)
    return {row["method"]: row for row in comparison.run()}, comparison


def constant_softcam(bias: tuple[float, float]):
    """A SoftCAM whose class evidence maps are constant: E_k = bias_k everywhere, on any image."""
    torch.manual_seed(0)
    model = classifier(head="softcam", **NET).eval()
    with torch.no_grad():
        model.head.class_evidence_layer.weight.zero_()
        model.head.class_evidence_layer.bias.copy_(torch.tensor(bias))
    return model


def test_rows_come_from_the_models_and_the_explainer_registry():
    models = {"black box": {"head": "linear"}, "black box + dual branch": {"head": "linear", "branch": True},
              "dense SoftCAM": {"head": "softcam"}, "SoftCAM + sigmoid branch": {"head": "softcam", "branch": True}}
    rows = default_contenders(models)
    assert [r.label for r in rows if r.model == "black box"] == [
        "black box + CAM", "black box + Grad-CAM", "black box + Grad-CAM++", "black box + XGrad-CAM", "black box + LayerCAM",
        "black box + Score-CAM", "black box + Integrated Gradients", "black box + Guided Backprop"]
    assert {r.target for r in rows if r.model == "black box"} == {"logit"}
    dual = [r for r in rows if r.model == "black box + dual branch"]
    assert len(dual) == 6 and {r.target for r in dual} == {"branch"} and dual[-1].label == "black box + dual branch + Score-CAM"
    # SoftCAM: the raw evidence map and the contrast map; its sigmoid branch: the branch's map
    assert [(r.label, r.method, r.target) for r in rows if "SoftCAM" in r.model] == [
        ("dense SoftCAM", "softcam", "logit"), ("dense SoftCAM (contrast)", "softcam", "contrast"),
        ("SoftCAM + sigmoid branch", "softcam", "branch")]


def test_sign_consistency_reads_the_disease_class_map_on_every_image(tmp_path):
    # E_0 = +1 and E_1 = -3 everywhere: every image is predicted healthy, and the disease class's map is
    # negative everywhere: no positive evidence on lesion images, all negative on healthy ones (the
    # predicted class's map, +1, would read the opposite)
    rows, _ = compare(tmp_path, {"SoftCAM": (constant_softcam((1.0, -3.0)), "softcam", False)},
                      [Contender("raw", "SoftCAM", "softcam"), Contender("contrast", "SoftCAM", "softcam", "contrast")],
                      test_set=tiny_test_set((1, 1, 1, 0)))
    for label in ("raw", "contrast"):  # the contrast map of class 1, E_1 - E_0 = -4, has the same signs
        assert rows[label]["sign_positive_lesion"] == 0 and rows[label]["sign_negative_healthy"] == 1
        assert rows[label]["sign_consistency"] == 0.25  # the predicted class's map would give 0.75
        assert math.isnan(rows[label]["deletion_audc"])  # no lesion image is classified correctly


def test_deletion_runs_on_correct_lesion_images_against_a_random_patch_order(tmp_path):
    # E_1 - E_0 > 0 everywhere: every image is predicted diseased, so the lesion images are all correct
    models = {"SoftCAM": (constant_softcam((-1.0, 2.0)), "softcam", False),
              "black box": (classifier(head="linear", **NET).eval(), "linear", False)}
    contenders = [Contender("raw", "SoftCAM", "softcam"), Contender("contrast", "SoftCAM", "softcam", "contrast"),
                  Contender("grad", "black box", "gradcam")]
    rows, comparison = compare(tmp_path, models, contenders, deletion_patch=8, deletion_fraction=0.25)
    # a constant SoftCAM is blind to its input: deleting patches in any order leaves p unchanged
    for label in ("raw", "contrast"):
        assert rows[label]["deletion_audc"] == pytest.approx(1) and rows[label]["deletion_gain"] == pytest.approx(0)
        assert rows[label]["insertion_auc"] == pytest.approx(1) and rows[label]["insertion_gain"] == pytest.approx(0)
    lesion = comparison.test_set.labels > 0  # the black box may get some wrong: only those all models get right count
    curves = comparison.perturbation.curves(comparison.load_model("SoftCAM"), torch.zeros(int(lesion.sum()), 32, 32), lesion)
    assert curves["deletion"].counts.tolist() == list(range(5))  # 16 patches of 8 x 8: 0.25 * 16 = 4, one at a time
    assert curves["deletion"].scores.shape == (int(lesion.sum()), 5)


def test_ceiling_and_chance_rows_for_every_map_resolution(tmp_path):
    torch.manual_seed(0)
    black_box = classifier(head="linear", **NET).eval()
    rows, comparison = compare(tmp_path, {"black box": (black_box, "linear", False)},
                               [Contender("grad", "black box", "gradcam"), Contender("gbp", "black box", "guided_backprop")])
    assert {name: row["kind"] for name, row in rows.items()} == {
        "grad": "method", "gbp": "method", "ideal map at 4x4": "ideal", "random map at 4x4": "random",
        "ideal map at 32x32": "ideal", "random map at 32x32": "random"}
    localisation = ["activation_precision", "activation_sensitivity", "top_k_precision", "pointing_game", "pxap",
                    "max_box_acc_v2", "gt_loc", "top1_loc"]
    assert all(rows["ideal map at 32x32"][c] == pytest.approx(1) for c in localisation)  # the mask itself
    coarse = rows["ideal map at 4x4"]  # an 8 x 8 lesion filling 4 of 16 cells, blurred by the upsampling
    assert coarse["pointing_game"] == 1 and coarse["activation_precision"] < 1
    for size in ("4x4", "32x32"):
        assert rows[f"random map at {size}"]["activation_precision"] < rows[f"ideal map at {size}"]["activation_precision"]
        assert "accuracy" not in rows[f"ideal map at {size}"]
    folder = comparison.output_dir
    with open(folder / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["kind"] for r in table] == ["method", "method", "ideal", "random", "ideal", "random"]
    assert table[2]["accuracy"] == "" and table[2]["raw_map_shape"] == "4x4"
    with open(folder / "box_accuracy_curves.csv") as f:
        curves = list(csv.DictReader(f))
    taus = sorted({float(r["tau"]) for r in curves if r["method"] == "grad"})
    assert len(taus) == 100 and taus[1] == pytest.approx(0.01)  # tau in steps of 0.01
    assert {r["method"] for r in curves} == set(rows) and {r["delta"] for r in curves} == {"0.3", "0.5", "0.7"}
    markdown = (folder / "comparison.md").read_text()
    assert "| *ideal map at 4x4* |" in markdown and (folder / "box_accuracy.png").is_file()


def test_the_comparison_runs_in_3d_with_the_same_columns(tmp_path):
    network = {**NET, "spatial_dims": 3}
    labels = torch.tensor([0, 1, 1, 0])
    images = torch.rand(4, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(4, 16, 16, 16, dtype=torch.bool)
    masks[labels == 1, 4:8, 8:12, 8:12] = True
    torch.manual_seed(0)
    models = {"SoftCAM": (classifier(head="softcam", **network).eval(), "softcam", False),
              "black box": (classifier(head="linear", **network).eval(), "linear", False)}
    contenders = [Contender("raw", "SoftCAM", "softcam"), Contender("contrast", "SoftCAM", "softcam", "contrast"),
                  Contender("grad", "black box", "gradcam")]
    rows, comparison = compare(tmp_path, models, contenders, ComparisonSet(images, labels, masks), network,
                               deletion_patch=8, deletion_fraction=0.5, randomisation_images=2)
    assert set(rows) == {"raw", "contrast", "grad", "ideal map at 2x2x2", "random map at 2x2x2"}
    for name in ("raw", "contrast", "grad"):
        row = rows[name]
        assert row["raw_map_shape"] == "2x2x2"
        for column in ("auc", "average_drop", "activation_precision", "pxap", "max_box_acc_v2", "gt_loc",
                       "sign_consistency", "randomisation_correlation"):
            assert not math.isnan(row[column]), (name, column)
    # two cells a side: the upsampled ideal map peaks at the volume's corner of the lesion's cell, off the lesion
    assert rows["ideal map at 2x2x2"]["pointing_game"] == 0
    assert rows["ideal map at 2x2x2"]["activation_precision"] > rows["random map at 2x2x2"]["activation_precision"]
    assert (comparison.output_dir / "method_grid.png").is_file()


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
    methods = {name: row for name, row in rows.items() if row["kind"] == "method"}
    # post-hoc on the black box, CAM variants on the dual branch, dense SoftCAM raw and contrast, the sigmoid branch
    assert len(methods) == 8 + 6 + 2 + 1
    assert "sparse SoftCAM" not in rows  # its checkpoint is missing: left out, not an error
    assert {"black box + Score-CAM", "black box + dual branch + Grad-CAM++", "dense SoftCAM", "dense SoftCAM (contrast)",
            "SoftCAM + sigmoid branch"} <= set(rows)
    for row in methods.values():
        assert 0.0 <= float(row["accuracy"]) <= 1.0 and 0.0 <= float(row["activation_precision"]) <= 1.0
    # ceiling and chance at the feature maps' and at the input's resolution
    assert {name for name, row in rows.items() if row["kind"] != "method"} == {
        f"{kind} map at {size}" for kind in ("ideal", "random") for size in ("2x2", "32x32")}


def test_the_dual_branch_keeps_the_black_boxs_classification(comparison):
    _, rows = comparison
    for column in ("accuracy", "balanced_accuracy", "auc", "kappa"):
        assert rows["black box + dual branch + CAM"][column] == rows["black box + CAM"][column]


def test_xgradcam_equals_gradcam_for_global_average_pooling(comparison):
    _, rows = comparison  # gradients of GAP + linear are spatially constant, so the maps are equal
    xgrad, grad = rows["black box + XGrad-CAM"], rows["black box + Grad-CAM"]
    columns = [c for c in grad if c not in ("method", "kind", "family", "seconds_per_image", "raw_map_shape")]
    assert grad["average_drop"] not in ("", "nan")  # defined on every test image
    for column in columns:  # NaN where both are undefined; patch ranks may break float ties differently
        assert float(xgrad[column]) == pytest.approx(float(grad[column]), abs=2e-3, nan_ok=True), column


def test_the_table_plots_and_grid_are_written_and_tracked(comparison):
    tmp, rows = comparison
    folder = tmp / "eval" / "comparison"
    markdown = (folder / "comparison.md").read_text().splitlines()
    assert len(markdown) == 2 + len(rows) and markdown[0].startswith("| method | Acc")
    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'eval' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("softcam-comparison").experiment_id
    (run,) = client.search_runs([experiment], "tags.`mlflow.parentRunId` IS NULL")
    assert run.info.run_name.startswith("comparison-")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "comparison.csv", "comparison.md", "comparison_table.json", "box_accuracy_curves.csv", "box_accuracy.png",
        "deletion_curves.png", "method_grid.png", "claims.md"}
    assert "dense SoftCAM, activation precision: **" in (folder / "claims.md").read_text()
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    assert [child.info.run_name for child in children] == list(rows)  # one per row (tests/test_mlflow_review.py)
    dense = next(child for child in children if child.info.run_name == "dense SoftCAM")
    assert dense.data.metrics["auc"] == pytest.approx(float(rows["dense SoftCAM"]["auc"]), abs=1e-4)
