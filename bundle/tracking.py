"""MLflow tracking around MONAI's MLFlowHandler: where the store is, making it safe for many
processes at once, and opening, reopening and logging into one run by its id."""

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
    """The id of experiment ``name``, created if missing; another process creating it at the same
    moment is not an error."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def open_run(uri: str, experiment_name: str, run_name: str) -> str:
    """Create a new run (status RUNNING) and return its id. Runs are told apart by id, never by name."""
    client = tracking_client(uri)
    return client.create_run(experiment_id(client, experiment_name, uri), run_name=run_name).info.run_id


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


def log_artifact(uri: str, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    """Log one file into run ``run_id``."""
    tracking_client(uri).log_artifact(run_id, str(path), artifact_path)


class InferenceTracking:
    """Log an inference run to MLflow: model identity, counts, the predictions table and overlays.

    The table logged here has no input paths (file names may carry UIDs); only row number, input
    kind, predicted class and probabilities.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str, max_overlays: int = 16):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.max_overlays = max_overlays

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
            params = {"model": summary.model.name, "model_version": summary.model.version,
                      "weights": summary.model.weights_digest, "spatial_dims": summary.spatial_dims,
                      "all_classes": summary.all_classes}
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
    """Log an explanation comparison to MLflow: its counts, every number of the table (as
    ``<column>.<row>``), and the table, curves and grid files. Nothing per image, no paths."""

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name

    def log_comparison(self, rows: list[dict], files: list[Path], counts: dict[str, int]) -> None:
        import math
        import re

        from mlflow.entities import Metric, Param

        client = tracking_client(self.tracking_uri)
        run_id = open_run(self.tracking_uri, self.experiment_name, self.run_name)
        try:
            now = int(1000 * time.time())
            values = [Metric(f"{key}.{re.sub(r'[^0-9A-Za-z_.-]+', '_', row['method'])}", float(value), now, 0)
                      for row in rows for key, value in row.items()
                      if isinstance(value, float) and not math.isnan(value)]
            for start in range(0, len(values), 900):  # MLflow takes at most 1000 metrics per batch
                client.log_batch(run_id, metrics=values[start : start + 900])
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in counts.items()])
            for path in files:
                client.log_artifact(run_id, str(path))
            client.set_terminated(run_id, "FINISHED")
        except Exception:
            client.set_terminated(run_id, "FAILED")
            raise
