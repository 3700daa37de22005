"""MLflow tracking around MONAI's MLFlowHandler: where the store is, and logging into the current run."""

from __future__ import annotations

import logging
import os
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
