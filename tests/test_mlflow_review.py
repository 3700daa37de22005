"""The MLflow store as a reviewer reads it, made by tiny trainings, evaluations, a comparison and an
inference through ``monai.bundle``: experiment kinds, links between runs, test metrics on the
training runs, galleries as stepped images, system metrics, and one child run per compared method."""

import csv
import json
import os
import shutil

import mlflow
import pytest

from bundle.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, PARENT_RUN_TAG, tracking_client, training_run_tags
from tests.conftest import run_bundle
from tests.mlflow_ui import Reviewer, browser_missing, chromium, mlflow_server

TINY = ["--backbone", "resnet10", "--backbone_kwargs", "{'widen_factor': 0.125}", "--image_size", "32",
        "--batch_size", "4", "--num_workers", "0", "--cache", "none"]
HEADS = ("softcam", "linear")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1")
    return env


def _ok(result) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def make_review_store(dataset, out) -> None:
    """Under ``out``: a tiny SoftCAM and black box, each trained two epochs into ``models/<head>`` and
    evaluated on the test split; the comparison of both; an inference of the SoftCAM on two images.
    All into one embedded store ``out/eval/mlflow.db``."""
    common = ["--dataset_dir", str(dataset), "--output_dir", str(out / "eval"), *TINY]
    for head in HEADS:
        model = ["--head", head, "--ckpt_dir", str(out / "models" / head)]
        _ok(run_bundle("--config_file", "configs/train.json", "--max_epochs", "2", "--system_metrics_interval", "0.5",
                       *model, *common, env=_env()))
        _ok(run_bundle("--config_file", "['configs/train.json','configs/evaluate.json']", *model, *common, env=_env()))
    _ok(run_bundle("--config_file", "['configs/train.json','configs/compare.json']", "--models_dir", str(out / "models"),
                   "--comparison#randomisation_images", "2", *common, env=_env(), timeout=900))
    images = out / "incoming"
    images.mkdir()
    for path in sorted((dataset / "images").glob("*.dcm"))[:2]:
        shutil.copy(path, images / path.name)
    _ok(run_bundle("--config_file", "configs/inference.json", "--input_dir", str(images), "--output_dir", str(out / "inference"),
                   "--ckpt_path", str(out / "models" / "softcam" / "model.pt"), "--head", "softcam",
                   "--tracking_uri", f"sqlite:///{out / 'eval' / 'mlflow.db'}", *TINY[:6], env=_env()))


@pytest.fixture(scope="module")
def review_store(dataset_2d, tmp_path_factory):
    out = tmp_path_factory.mktemp("review")
    make_review_store(dataset_2d, out)
    return out


def _client(out):
    return mlflow.MlflowClient(f"sqlite:///{out / 'eval' / 'mlflow.db'}")


def _runs(client, experiment: str, filter_string: str = "", order_by=None):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], filter_string, order_by=order_by)


def _training_run_id(out, head: str) -> str:
    return json.loads((out / "models" / head / "run.json").read_text())["run_id"]


def test_every_experiment_is_a_custom_model_development(review_store):
    client = _client(review_store)
    experiments = {e.name: e for e in client.search_experiments()}
    assert {"softcam", "softcam-comparison", "softcam-inference"} <= set(experiments)
    for name in ("softcam", "softcam-comparison", "softcam-inference"):
        assert experiments[name].tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND, name


def test_training_runs_hold_their_test_metrics_and_sort_by_them(review_store):
    client = _client(review_store)
    for head in HEADS:
        training = client.get_run(_training_run_id(review_store, head))
        evaluation = client.get_run(training.data.tags["test_run_id"])
        assert evaluation.info.run_name.startswith(f"resnet10-{head}-test-")
        for key in ("auc", "accuracy"):
            assert training.data.metrics[f"test_{key}"] == pytest.approx(evaluation.data.metrics[key])
    by_test_auc = _runs(client, "softcam", "metrics.test_auc >= 0", ["metrics.test_auc DESC"])
    assert {r.info.run_id for r in by_test_auc} == {_training_run_id(review_store, head) for head in HEADS}
    scores = [r.data.metrics["test_auc"] for r in by_test_auc]
    assert scores == sorted(scores, reverse=True)


def test_an_evaluation_is_nested_under_the_training_run_it_tests(review_store):
    client = _client(review_store)
    for head in HEADS:
        training_id = _training_run_id(review_store, head)
        children = _runs(client, "softcam", f"tags.`{PARENT_RUN_TAG}` = '{training_id}'")
        assert len(children) == 1 and "-test-" in children[0].info.run_name
        assert children[0].data.tags["training_run_id"] == training_id


def test_galleries_are_mlflow_images_stepped_by_epoch(review_store):
    client = _client(review_store)
    run_id = _training_run_id(review_store, "softcam")
    images = [a.path.removeprefix("images/") for a in client.list_artifacts(run_id, "images")]
    full = [name for name in images if name.endswith(".png")]
    assert sorted(name.split("+")[:3] for name in full) == [["evidence_gallery", "step", "1"], ["evidence_gallery", "step", "2"]]
    assert len([name for name in images if name.endswith("+compressed.webp")]) == 2  # the UI's thumbnails
    assert client.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"


def test_system_metrics_of_the_training_machine(review_store):
    client = _client(review_store)
    run = client.get_run(_training_run_id(review_store, "softcam"))
    system = {key for key in run.data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    history = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert [m.step for m in history] == list(range(len(history)))
    assert all(0 <= m.value <= 100 for m in history)


def _comparison(out):
    client = _client(out)
    parents = _runs(client, "softcam-comparison", f"tags.`{PARENT_RUN_TAG}` IS NULL")
    assert len(parents) == 1
    children = _runs(client, "softcam-comparison", f"tags.`{PARENT_RUN_TAG}` = '{parents[0].info.run_id}'")
    with open(out / "eval" / "comparison" / "comparison.csv") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    return client, parents[0], {run.info.run_name: run for run in children}, rows


def test_one_child_run_per_compared_method_named_as_in_the_table(review_store):
    _, _, children, rows = _comparison(review_store)
    assert list(children) == list(rows)  # MLflow lists them newest first: in the table's order
    assert {"black box + Grad-CAM++", "dense SoftCAM", "dense SoftCAM (contrast)", "ideal map at 2x2"} <= set(children)
    for name, row in rows.items():
        run = children[name]
        assert run.info.status == "FINISHED"
        assert run.data.params["kind"] == row["kind"]
        numbers = {key: float(value) for key, value in row.items()
                   if key not in ("method", "kind", "family", "raw_map_shape") and value not in ("", "nan")}
        assert set(run.data.metrics) == set(numbers), name  # the table's columns, the same keys in every child
        for key, value in numbers.items():
            assert run.data.metrics[key] == pytest.approx(value, abs=1e-4), (name, key)


def test_a_methods_child_run_names_model_head_explainer_and_target_and_links_its_training(review_store):
    _, _, children, _ = _comparison(review_store)
    grad = children["black box + Grad-CAM++"].data
    assert {k: grad.params[k] for k in ("model", "head", "explainer", "target")} == {
        "model": "black box", "head": "linear", "explainer": "Grad-CAM++", "target": "logit"}
    assert grad.tags["training_run_id"] == _training_run_id(review_store, "linear")
    contrast = children["dense SoftCAM (contrast)"].data
    assert (contrast.params["explainer"], contrast.params["target"]) == ("SoftCAM", "contrast")
    assert contrast.tags["training_run_id"] == _training_run_id(review_store, "softcam")
    ceiling = children["ideal map at 2x2"].data
    assert ceiling.params == {"kind": "ideal", "explainer": "ideal map", "raw_map_shape": "2x2"}
    assert "training_run_id" not in ceiling.tags
    assert set(ceiling.metrics) <= {"activation_precision", "activation_sensitivity", "top_k_precision", "pointing_game",
                                    "pxap", "max_box_acc_v2", "gt_loc", "top1_loc"}


def test_the_comparison_run_keeps_the_table_curves_and_grid(review_store):
    client, parent, _, rows = _comparison(review_store)
    assert not parent.data.metrics
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "comparison_table.json", "comparison.csv", "comparison.md", "box_accuracy_curves.csv", "box_accuracy.png",
        "deletion_curves.png", "method_grid.png"}
    table = json.loads(open(client.download_artifacts(parent.info.run_id, "comparison_table.json")).read())
    columns = table["columns"]
    assert columns[:3] == ["method", "kind", "accuracy"]
    assert [line[0] for line in table["data"]] == list(rows)  # the table's rows, in its order
    assert json.loads(parent.data.tags["mlflow.loggedArtifacts"]) == [{"path": "comparison_table.json", "type": "table"}]


def test_the_inference_run_names_the_training_run_of_its_checkpoint(review_store):
    client = _client(review_store)
    (run,) = _runs(client, "softcam-inference")
    assert run.data.tags["training_run_id"] == _training_run_id(review_store, "softcam")
    assert PARENT_RUN_TAG not in run.data.tags  # another experiment: a tag, not a nesting


def test_a_checkpoint_without_a_training_run_links_nothing(tmp_path):
    client = tracking_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "model.pt").write_bytes(b"")
    assert training_run_tags(client, tmp_path / "model.pt") == {}
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "0" * 32}))  # a run of another store
    assert training_run_tags(client, tmp_path / "model.pt") == {}


# --- in a browser: MLflow's own UI over the same store ----------------------------------------------
@pytest.fixture(scope="module")
def reviewer(review_store):
    """A reviewer's browser (Debian's headless Chromium) on ``mlflow server`` over the store."""
    why = browser_missing()
    if why:
        pytest.skip(why)
    with mlflow_server(review_store / "eval" / "mlflow.db", review_store / "server.log") as url, chromium() as driver:
        yield Reviewer(driver, url), review_store


def test_in_the_browser_training_runs_sort_by_test_auc_with_evaluations_system_metrics_and_galleries(reviewer):
    browser, out = reviewer
    client = _client(out)
    experiment = client.get_experiment_by_name("softcam").experiment_id
    training = [client.get_run(_training_run_id(out, head)) for head in HEADS]
    by_test_auc = "orderByKey=metrics.%60test_auc%60&orderByAsc=false"
    # the chart view: a chart per metric, the test metrics as bars of the training runs, the galleries, the machine
    text = browser.open(f"experiments/{experiment}/runs?{by_test_auc}&compareRunsMode=CHART",
                        *[run.info.run_name for run in training], "test_auc", "test_accuracy", "evidence_gallery",
                        "System metrics")
    shown = sorted(training, key=lambda run: text.index(run.info.run_name))
    # the gallery chart: a slider over the epochs its images were logged at
    assert ("1", "2") in browser.sliders()
    assert [run.data.metrics["test_auc"] for run in shown] == sorted((r.data.metrics["test_auc"] for r in training), reverse=True)
    # the evaluations, nested under the training runs they test
    evaluations = [client.get_run(run.data.tags["test_run_id"]).info.run_name for run in training]
    browser.expand_nested_runs(*evaluations)
    browser.screenshot(out / "training_runs.png")
    # one training run: its parameters, test metrics, system metrics and evaluation on its own page
    browser.open(f"experiments/{experiment}/runs/{training[0].info.run_id}", training[0].info.run_name, "test_auc",
                 "learning_rate", "system/cpu_utilization_percentage", "Child runs", evaluations[0])


def test_in_the_browser_the_comparison_has_a_child_run_per_method_with_its_metrics(reviewer):
    browser, out = reviewer
    client, parent, children, _ = _comparison(out)
    experiment = parent.info.experiment_id
    # a chart per metric, a bar per method, once the comparison run is opened in the runs list
    text = browser.open(f"experiments/{experiment}/runs?compareRunsMode=CHART", parent.info.run_name)
    assert "black box + Grad-CAM++" not in text  # the children are folded under the comparison run
    text = browser.expand_nested_runs(*children, "activation_precision", "auc", "deletion_audc")
    assert sorted(children, key=text.index) == list(children)  # listed in the table's order
    browser.screenshot(out / "comparison_runs.png")
    # the children side by side: MLflow's compare view of their params and metrics
    ids = json.dumps([run.info.run_id for run in children.values()], separators=(",", ":"))
    text = browser.open(f"compare-runs?runs={ids}&experiments=[%22{experiment}%22]", *children, "activation_precision",
                        "deletion_audc", "explainer", "Grad-CAM++", "Integrated Gradients", "contrast")
    assert f"Comparing {len(children)} Runs" in text
    # one method's own page: the comparison run it belongs to, and the training run of its model
    grad = children["black box + Grad-CAM++"]
    browser.open(f"experiments/{experiment}/runs/{grad.info.run_id}", "black box + Grad-CAM++", parent.info.run_name,
                 grad.data.tags["training_run_id"], "activation_precision")
