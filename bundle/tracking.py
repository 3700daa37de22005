"""MLflow tracking around MONAI's MLFlowHandler: where the store is, and logging into the current run."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def tracking_uri(output_dir: str | Path, uri: str | None = None) -> str:
    """The MLflow tracking URI: ``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else an embedded
    SQLite store ``output_dir/mlflow.db`` (artifacts beside it in ``output_dir/mlruns``)."""
    from monai.utils import path_to_sqlite_uri

    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return path_to_sqlite_uri(str(Path(output_dir).resolve() / "mlflow.db"))


def artifact_location(uri: str) -> str | None:
    """Artifacts of an embedded SQLite store go in ``mlruns`` beside the database (as MONAI's
    MLFlowHandler puts them), not in the working directory; a server decides for itself."""
    from monai.utils import path_to_uri

    if uri.startswith("sqlite:///"):
        return path_to_uri(Path(uri.removeprefix("sqlite:///")).parent / "mlruns")
    return None


def log_artifact_to_active_run(uri: str, experiment_name: str, run_name: str, path: Path, artifact_path: str) -> bool:
    """Log a file into the unfinished run named ``run_name``: the run MONAI's MLFlowHandler opened.

    Returns False (and logs why) when there is no such run, so a tracking hiccup never stops training.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        logger.warning("MLflow experiment %r not found; %s kept on disk only", experiment_name, path.name)
        return False
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"attributes.run_name = '{run_name}' and attributes.status = 'RUNNING'",
        max_results=1,
    )
    if not runs:
        logger.warning("no running MLflow run %r; %s kept on disk only", run_name, path.name)
        return False
    client.log_artifact(runs[0].info.run_id, str(path), artifact_path)
    return True


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

        import mlflow
        from mlflow.entities import Metric, Param

        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment_name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            self.experiment_name, artifact_location=artifact_location(self.tracking_uri))
        run_id = client.create_run(experiment_id, run_name=self.run_name).info.run_id
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
