"""The trained model in MLflow: its training data as a dataset input, its best checkpoint as an MLflow model,
registered under the model's name, and the ``champion`` alias on the best registered version.

``PublishTrainedModel`` (configs/train.json, process 0 only) does this in the training's own MLflow run (the
run id of ``bundle.runs.start_training_run``):

- when training starts: the training datalist as an MLflow dataset input (context "training"): its label
  counts per split and the datalist's digest (``bundle.data.datalist_digest``), never a path, since file
  names may carry UIDs. A resumed training does not log it twice;
- when training completes: ``model.pt`` (the best checkpoint, self-describing: ``bundle.checkpoints``) as an
  MLflow pyfunc model ``model`` (:class:`EvidenceModel`) with a tensor signature, an input example and the
  ``bundle`` package as its code, registered as a new version of the model name; the version is tagged with
  its run's best validation AUC (the key metric ``model.pt`` was kept for) and the datalist digest.

Champion: the alias ``champion`` names the registered version with the highest validation AUC among the
versions registered under that name. A new version takes the alias only if its AUC is higher than the
current champion's (a tie keeps the champion; an AUC that is not a number never displaces one that is);
the first version of a name becomes champion. Deployments load ``models:/<name>@champion``. AUCs compare
models validated on the same data: each version's ``datalist_digest`` tag says which data that was.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import torch
from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)

CHAMPION = "champion"
AUC_TAG = "validation_auc"
MODEL_ARTIFACT = "model"
DATASET_CONTEXT = "training"


class EvidenceModel(mlflow.pyfunc.PythonModel):
    """An MLflow pyfunc over a bundle checkpoint (artifact ``checkpoint``), which describes its own network.

    ``predict`` takes an image batch (N, Ch, *S) float32, preprocessed as the bundle's inference does
    (windowed into [0, 1], resized and padded to the training image size), and returns
    ``{"probabilities": (N, C) softmax, "evidence_maps": (N, C, h, w[, d])}``: the class maps the
    logits are the spatial mean of, at the network's feature resolution (``forward_with_maps``).
    """

    def load_context(self, context) -> None:
        from bundle.checkpoints import load_checkpoint, network_for_checkpoint

        path = context.artifacts["checkpoint"]
        self.network = network_for_checkpoint(path)
        load_checkpoint(self.network, path)
        self.network.eval()

    def predict(self, context, model_input, params=None) -> dict[str, np.ndarray]:
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            logits, maps = self.network.forward_with_maps(images)
        return {"probabilities": logits.float().softmax(1).numpy(), "evidence_maps": maps.float().numpy()}


def signature(in_channels: int, image_size: int, spatial_dims: int, num_classes: int):
    """The model's tensor signature: images (-1, Ch, S, S[, S]) in; probabilities (-1, C) and evidence maps
    (-1, C, -1, -1[, -1]) out (their size depends on the backbone's output stride)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    float32 = np.dtype(np.float32)
    return ModelSignature(
        inputs=Schema([TensorSpec(float32, (-1, in_channels, *[image_size] * spatial_dims))]),
        outputs=Schema([TensorSpec(float32, (-1, num_classes), "probabilities"),
                        TensorSpec(float32, (-1, num_classes, *[-1] * spatial_dims), "evidence_maps")]),
    )


def requirements() -> list[str]:
    """What the logged model needs installed, pinned to this environment (given, so MLflow does not start
    a process to infer them); the bundle's own code travels with the model."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "monai", "mlflow", "numpy")]


@contextmanager
def _tracking_store(uri: str):
    """MLflow logs models into the store of its global tracking URI: point it at ``uri`` for the block."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _auc(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def promote_if_best(client, name: str, version: str, auc: float) -> bool:
    """Move the ``champion`` alias of registered model ``name`` to ``version`` if its validation AUC is higher
    than the champion's, or there is no champion (see the module's doc); return whether it moved."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    if champion is not None:
        held = _auc(champion.tags.get(AUC_TAG))
        if math.isnan(auc) or (not math.isnan(held) and held >= auc):
            return False
    client.set_registered_model_alias(name, CHAMPION, version)
    return True


def log_trained_model(tracking_uri: str, run_id: str, checkpoint: str | Path, registered_name: str, auc: float,
                      datalist_digest: str = "") -> str:
    """Log ``checkpoint`` into run ``run_id`` as the pyfunc model ``model``, register it under
    ``registered_name`` with its validation ``auc``, give it the ``champion`` alias if it is the best; return
    the new version. The signature and input example follow the checkpoint's description."""
    import bundle
    from bundle.checkpoints import read_description, settings

    trained = settings(read_description(checkpoint))
    shape = (1, trained["in_channels"], *[trained["image_size"]] * trained["spatial_dims"])
    # in the training's run: MLflow files the logged model under the active run's experiment
    with _tracking_store(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=EvidenceModel(), artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(Path(bundle.__file__).parent)], pip_requirements=requirements(),
            signature=signature(trained["in_channels"], trained["image_size"], trained["spatial_dims"],
                                trained["num_classes"]),
            input_example=np.zeros(shape, dtype=np.float32),
            registered_model_name=registered_name, await_registration_for=0,
        )
        client = mlflow.MlflowClient()
        version = str(info.registered_model_version)
        client.set_model_version_tag(registered_name, version, AUC_TAG, str(auc))
        if datalist_digest:
            client.set_model_version_tag(registered_name, version, "datalist_digest", datalist_digest)
        if promote_if_best(client, registered_name, version, auc):
            logger.info("registered %s version %s (validation AUC %.4f), now the %s", registered_name, version, auc,
                        CHAMPION)
        else:
            logger.info("registered %s version %s (validation AUC %.4f); the %s stays", registered_name, version, auc,
                        CHAMPION)
    return version


def log_datalist(tracking_uri: str, run_id: str, datalist: dict, dataset_dir: str | Path,
                 class_names: dict | None = None) -> None:
    """Log the training datalist into run ``run_id`` as an MLflow dataset input: a table of (split, label,
    class name, count) with the datalist's digest, without a path. Not again if the run holds it already."""
    import pandas as pd
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    from bundle.data import datalist_digest, label_counts
    from bundle.tracking import tracking_client

    names = {str(k): str(v) for k, v in (class_names or {}).items()}
    table = pd.DataFrame([(split, label, names.get(str(label), f"class {label}"), n)
                          for split, label, n in label_counts(datalist)],
                         columns=["split", "label", "class_name", "count"])
    digest = datalist_digest(datalist, dataset_dir)
    source = CodeDatasetSource({"described_by": "bundle.data.label_counts", "paths": "not logged"})
    dataset = mlflow.data.from_pandas(table, source=source, name="datalist", digest=digest)
    client = tracking_client(tracking_uri)
    if any(d.dataset.digest == digest for d in client.get_run(run_id).inputs.dataset_inputs):
        return
    client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                            [InputTag("mlflow.data.context", DATASET_CONTEXT)])])


class PublishTrainedModel:
    """Ignite handler for the trainer (configs/train.json, before the MLflow handler that ends the run): logs
    the datalist when training starts and publishes ``ckpt_dir/model.pt`` when it completes (module doc).

    ``evaluator``: the validation engine, whose best key metric (AUC) is the one ``model.pt`` was kept for.
    Tracking never stops a training: a failure is logged as a warning, the checkpoint stays on disk.
    """

    def __init__(self, tracking_uri: str, run_id: str | None, ckpt_dir: str, model_name: str, evaluator: Engine,
                 datalist: dict, dataset_dir: str, class_names: dict | None = None, enabled: bool = True):
        self.tracking_uri, self.run_id, self.ckpt_dir, self.model_name = tracking_uri, run_id, Path(ckpt_dir), model_name
        self.evaluator, self.datalist, self.dataset_dir, self.class_names = evaluator, datalist, dataset_dir, class_names
        self.enabled = enabled and bool(run_id)

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self._log_datalist)
            engine.add_event_handler(Events.COMPLETED, self._publish)

    def _log_datalist(self, engine: Engine) -> None:
        try:
            log_datalist(self.tracking_uri, self.run_id, self.datalist, self.dataset_dir, self.class_names)
        except Exception as err:  # tracking must never stop training
            logger.warning("could not log the training datalist to MLflow: %s", err)

    def _publish(self, engine: Engine) -> None:
        from bundle.data import datalist_digest

        checkpoint = self.ckpt_dir / "model.pt"
        if not checkpoint.is_file():
            logger.warning("no %s to publish: no validation ran, so no best model was kept", checkpoint.name)
            return
        try:
            log_trained_model(self.tracking_uri, self.run_id, checkpoint, self.model_name,
                              _auc(getattr(self.evaluator.state, "best_metric", None)),
                              datalist_digest(self.datalist, self.dataset_dir))
        except Exception as err:  # tracking must never stop training
            logger.warning("could not log %s as an MLflow model: %s", checkpoint.name, err)
