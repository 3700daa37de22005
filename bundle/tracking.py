"""MLflow tracking around MONAI's MLFlowHandler: where the store is, making it safe for many
processes at once, opening, reopening and logging into one run by its id, and linking runs.

Every experiment the bundle creates is tagged ``mlflow.experimentKind = custom_model_development``
(MLflow 3's UI otherwise offers its GenAI views, traces and judges, for it). Runs that use a trained
model (evaluation, comparison, inference) name the training run that made it: the tags
``training_run_id`` / ``training_run_name`` / ``training_experiment_id``, read from ``run.json`` in
the checkpoint's folder (``bundle.runs``). A run in the training run's own experiment (the
evaluation of a checkpoint) is also nested under it (``mlflow.parentRunId``), so the UI shows it
below the training run it tests.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# How long a process waits for another one's write to an embedded SQLite store before giving up
# (SQLite's own default is 5 s, which several trainings logging every iteration exceed).
SQLITE_BUSY_TIMEOUT_S = 60
# MLflow 3's UI reads the kind of an experiment from this tag (the values its frontend knows)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow's own tag for nested runs: the UI lists the run under its parent
PARENT_RUN_TAG = "mlflow.parentRunId"


def tracking_uri(output_dir: str | Path, uri: str | None = None) -> str:
    """The MLflow tracking URI: ``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else an embedded
    SQLite store ``output_dir/mlflow.db`` (artifacts beside it in ``output_dir/mlruns``).

    A SQLite URI comes back with a busy timeout and its store created (see :func:`prepared_uri`)."""
    from monai.utils import path_to_sqlite_uri

    if not uri:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        uri = path_to_sqlite_uri(str(Path(output_dir).resolve() / "mlflow.db"))
    return prepared_uri(uri)


def _sqlite_path(uri: str) -> str | None:
    """The database file of a ``sqlite:///`` URI (without its query), None for other stores."""
    from urllib.parse import unquote

    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri.removeprefix("sqlite:///").split("?", 1)[0])
    return path if path and path != ":memory:" else None


@functools.cache
def prepared_uri(uri: str) -> str:
    """``uri``, made safe for several processes sharing one embedded SQLite store; other URIs unchanged.

    - SQLite gets ``timeout`` (:data:`SQLITE_BUSY_TIMEOUT_S`; SQLAlchemy passes it to ``sqlite3.connect``)
      unless the URI sets one, so a writer waits for another's transaction instead of failing with
      "database is locked".
    - The store's tables are created under a file lock (``<db>.lock``): MLflow creates and migrates
      the schema of a new database in whichever process opens it first, and two processes doing so
      at once fail ("table ... already exists", "duplicate column name").
    """
    import mlflow
    from filelock import FileLock

    path = _sqlite_path(uri)
    if path is None:
        return uri
    if "timeout=" not in uri.partition("?")[2]:
        uri += ("&" if "?" in uri else "?") + f"timeout={SQLITE_BUSY_TIMEOUT_S}"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path + ".lock"):
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates the schema once
    return uri


def tracking_client(uri: str):
    """An ``MlflowClient`` on ``uri`` after :func:`prepared_uri`."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=prepared_uri(uri))


def artifact_location(uri: str) -> str | None:
    """Artifacts of an embedded SQLite store go in ``mlruns`` beside the database (as MONAI's
    MLFlowHandler puts them), not in the working directory; a server decides for itself."""
    from monai.utils import path_to_uri

    path = _sqlite_path(uri)
    return path_to_uri(Path(path).parent / "mlruns") if path else None


def experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if missing, tagged with :data:`EXPERIMENT_KIND`; another
    process creating it at the same moment is not an error."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    tag_experiment_kind(client, experiment)
    return experiment.experiment_id


def tag_experiment_kind(client, experiment) -> None:
    """Tag ``experiment`` (an MLflow Experiment) with :data:`EXPERIMENT_KIND` unless it has a kind:
    experiments made by an earlier version of the bundle or by MONAI's handler get one; a kind a
    user chose stays."""
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def training_run_tags(client, checkpoint: str | Path | None, nest_in: str | None = None) -> dict[str, str]:
    """Tags naming the training run that wrote ``checkpoint`` (a ``model.pt`` or its folder), found
    from ``run.json`` in that folder; with ``nest_in`` (an experiment id) also ``mlflow.parentRunId``
    when the training run is in that experiment. Empty, with a log line, when the folder has no
    ``run.json`` (weights from elsewhere) or its run is not in this store."""
    from mlflow.exceptions import MlflowException

    from bundle.runs import read_run_record  # bundle.runs builds on this module

    if not checkpoint:
        return {}
    folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    try:
        run = client.get_run(read_run_record(folder)["run_id"])
    except (FileNotFoundError, ValueError, KeyError, MlflowException) as err:
        logger.info("no training run to link for the checkpoint in %s: %s", folder.name, str(err).splitlines()[0])
        return {}
    tags = {"training_run_id": run.info.run_id, "training_run_name": run.info.run_name,
            "training_experiment_id": run.info.experiment_id}
    if nest_in is not None and run.info.experiment_id == nest_in:
        tags[PARENT_RUN_TAG] = run.info.run_id
    return tags


def link_to_training(uri: str, run_id: str, checkpoint: str | Path | None) -> None:
    """Tag run ``run_id`` with the training run of ``checkpoint`` (:func:`training_run_tags`, not
    nested) and its experiment with its kind: for a run opened elsewhere (the inference run)."""
    client = tracking_client(uri)
    run = client.get_run(run_id)
    tag_experiment_kind(client, client.get_experiment(run.info.experiment_id))
    for key, value in training_run_tags(client, checkpoint).items():
        client.set_tag(run_id, key, value)


def open_run(uri: str, experiment_name: str, run_name: str, checkpoint: str | Path | None = None) -> str:
    """Create a new run (status RUNNING) and return its id. Runs are told apart by id, never by name.

    ``checkpoint``: the model the run uses; the run is linked to the training run that wrote it
    (:func:`training_run_tags`, nested when that run is in the same experiment)."""
    client = tracking_client(uri)
    experiment = experiment_id(client, experiment_name, uri)
    tags = training_run_tags(client, checkpoint, nest_in=experiment)
    return client.create_run(experiment, run_name=run_name, tags=tags).info.run_id


def reopen_run(uri: str, run_id: str, params: dict | None = None) -> str:
    """Mark run ``run_id`` RUNNING again, to continue logging into it; return its id.

    ``params`` (what the continuing process would log) must equal what the run holds: a resumed
    training is the same training, and MLflow refuses a changed parameter anyway, late and obscurely.
    """
    from mlflow.exceptions import MlflowException

    client = tracking_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ValueError(f"MLflow run {run_id} is not in the store {uri}: resume with the --output_dir or "
                         f"--tracking_uri the training was started with") from err
    logged = run.data.params
    changed = {k: (logged[k], str(v)) for k, v in (params or {}).items() if k in logged and logged[k] != str(v)}
    if changed:
        listing = ", ".join(f"{k}: {old} (run) != {new} (now)" for k, (old, new) in sorted(changed.items()))
        raise ValueError(f"cannot resume MLflow run {run.info.run_name!r} with other settings: {listing}")
    client.update_run(run_id, status="RUNNING")
    return run_id


def image_steps(client, run_id: str, key: str) -> list[int]:
    """The steps at which run ``run_id`` holds the MLflow image ``key``, sorted (with repeats).

    MLflow keeps no index of them: each is a file ``images/<key>+step+<n>+timestamp+...png`` (older
    MLflow versions: ``%`` for ``+``), read back here as MLflow's UI reads it."""
    import re

    steps = []
    for artifact in client.list_artifacts(run_id, "images"):
        name = artifact.path.rsplit("/", 1)[-1]
        match = re.fullmatch(r"(.+?)([+%])step\2(\d+)\2timestamp\2\d+\2[^+%]+\.png", name)
        if match and match.group(1).replace("~", "/").replace("#", "/") == key:
            steps.append(int(match.group(3)))
    return sorted(steps)


def log_image(uri: str, run_id: str, path: Path, key: str, step: int) -> None:
    """Log the image file ``path`` into run ``run_id`` as an MLflow image ``key`` at ``step``: the
    UI's image view of the run shows one image per key with a slider over the steps."""
    from PIL import Image

    with Image.open(path) as image:
        tracking_client(uri).log_image(run_id, image.convert("RGB"), key=key, step=step, synchronous=True)


class InferenceTracking:
    """Log an inference run to MLflow: model identity, counts, the predictions table and overlays.

    The table logged here has no input paths (file names may carry UIDs); only row number, input
    kind, predicted class and probabilities. ``checkpoint``: the model's weights; the run is linked
    to the training run that wrote them (:func:`link_to_training`).
    """

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str, max_overlays: int = 16,
                 checkpoint: str | None = None):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.max_overlays = max_overlays
        self.checkpoint = checkpoint

    def log_inference(self, summary) -> None:
        """Log ``summary`` (a ``bundle.inference.InferenceSummary``: counts, model identity, table rows
        without paths, overlay files) as one finished run."""
        import csv
        import tempfile

        import mlflow

        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment_name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            self.experiment_name, artifact_location=artifact_location(self.tracking_uri))
        run = client.create_run(experiment_id, run_name=self.run_name)
        run_id = run.info.run_id
        try:
            link_to_training(self.tracking_uri, run_id, self.checkpoint)
            params = {"model": summary.model.name, "model_version": summary.model.version,
                      "weights": summary.model.weights_digest, "spatial_dims": summary.spatial_dims,
                      "all_classes": summary.all_classes, "evidence_map": summary.model.evidence_map}
            for key, value in params.items():
                client.log_param(run_id, key, value)
            client.log_metric(run_id, "inputs_processed", summary.processed + summary.resumed)
            client.log_metric(run_id, "inputs_resumed", summary.resumed)  # done by an interrupted earlier run
            client.log_metric(run_id, "inputs_failed", summary.failed)
            predicted = [row[2] for row in summary.rows]
            for k in sorted(set(predicted)):
                client.log_metric(run_id, f"predicted_{k}", predicted.count(k))
            with tempfile.TemporaryDirectory() as folder:
                table = Path(folder) / "predictions.csv"
                with open(table, "w", newline="") as f:
                    writer = csv.writer(f)
                    classes = range(len(summary.rows[0][3])) if summary.rows else []
                    writer.writerow(["row", "kind", "frame", "predicted_class"] + [f"p_{k}" for k in classes])
                    for i, (kind, frame, predicted_class, probabilities) in enumerate(summary.rows):
                        writer.writerow([i, kind, "" if frame is None else frame, predicted_class,
                                         *[f"{p:.6f}" for p in probabilities]])
                client.log_artifact(run_id, str(table))
                overlays = Path(folder) / "overlays"  # neutral names: input file names may carry UIDs
                overlays.mkdir()
                for i, png in enumerate(summary.overlays[: self.max_overlays]):
                    shutil.copy(png, overlays / f"overlay_{i:03d}.png")
                client.log_artifacts(run_id, str(overlays), "overlays")
            client.set_terminated(run_id, "FINISHED")
        except Exception:
            client.set_terminated(run_id, "FAILED")
            raise


class ComparisonTracking:
    """Log an explanation comparison to MLflow as MLflow's compare views read it: a parent run holding
    the table (files and an MLflow table), the curves, the box-accuracy plot and the grid, and one
    child run per row of the table (``mlflow.parentRunId``), named as in the table, with the table's
    columns as metrics under the same keys in every child (``accuracy``, ``deletion_audc``,
    ``activation_precision``, ...; a column that does not apply is left out, not logged as NaN).

    A method's child has the params ``kind`` ("method"), ``model``, ``head``, ``explainer``,
    ``target`` and ``raw_map_shape`` and is linked to its model's training run (``training_run_id``,
    :func:`training_run_tags`). The ceiling and chance rows of each map resolution are children too
    (``kind`` "ideal" / "random", ``explainer`` "ideal map" / "random map", localisation metrics
    only): a reviewer then sees them beside the
    methods in the same charts and parallel coordinates, under the same metric keys, where parent
    metrics would need one mangled key per resolution and column. Nothing per image, no paths.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name

    def log_comparison(self, rows: list[dict], files: list[Path], counts: dict[str, int],
                       methods: dict[str, dict] | None = None) -> str:
        """Log the comparison; return the parent run's id. ``rows``: the table (``method``, ``kind``,
        columns); ``methods``: a row's label -> its params (model, head, explainer, target) and the
        model's ``checkpoint`` (for the training-run link, not logged)."""
        client = tracking_client(self.tracking_uri)
        parent = open_run(self.tracking_uri, self.experiment_name, self.run_name)
        children = []
        try:
            client.log_batch(parent, params=[_param(k, v) for k, v in counts.items()])
            client.log_table(parent, data=_table(rows), artifact_file="comparison_table.json")
            for path in files:
                client.log_artifact(parent, str(path))
            experiment = client.get_run(parent).info.experiment_id
            # MLflow lists runs newest first: created from the last row up, they read in the table's order
            for row in reversed(rows):
                children.append(self._log_row(client, experiment, parent, row, dict((methods or {}).get(row["method"], {}))))
            for run_id in [*children, parent]:
                client.set_terminated(run_id, "FINISHED")
        except Exception:
            for run_id in [*children, parent]:
                client.set_terminated(run_id, "FAILED")
            raise
        return parent

    def _log_row(self, client, experiment: str, parent: str, row: dict, method: dict) -> str:
        from mlflow.entities import Metric

        tags = {**training_run_tags(client, method.pop("checkpoint", None)), PARENT_RUN_TAG: parent}
        run_id = client.create_run(experiment, run_name=row["method"], tags=tags).info.run_id
        now = int(1000 * time.time())
        metrics = [Metric(key, value, now, 0) for key, value in row.items() if _number(value)]
        kind = row.get("kind", "method")
        if kind != "method":  # the ideal or random map stands where an explainer would
            method.setdefault("explainer", f"{kind} map")
        params = {"kind": kind, **method, "raw_map_shape": row.get("raw_map_shape", "")}
        client.log_batch(run_id, metrics=metrics, params=[_param(k, v) for k, v in params.items() if v != ""])
        return run_id


def _number(value) -> bool:
    import math

    return isinstance(value, float) and not math.isnan(value)


def _param(key: str, value):
    from mlflow.entities import Param

    return Param(key, str(value))


def _table(rows: list[dict]) -> dict[str, list]:
    """The comparison table as MLflow's ``log_table`` takes it: column -> values, in the table's order
    (``bundle.explain.report.COLUMNS``); None where a column does not apply."""
    from bundle.explain.report import COLUMNS

    columns = ["method", "kind", *[key for key, _, _ in COLUMNS], "raw_map_shape"]
    return {key: [row.get(key) if not isinstance(row.get(key), float) or _number(row.get(key)) else None for row in rows]
            for key in columns}
