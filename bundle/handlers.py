"""Ignite/MONAI event handlers used by the bundle configs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler
from monai.utils import flatten_dict
from torch.nn.parallel import DistributedDataParallel

from bundle.networks.classifier import ImageClassifier
from bundle.tracking import image_steps, log_image, prepared_uri, tracking_client, training_run_tags
from bundle.visualize import save_evidence_gallery

logger = logging.getLogger(__name__)


class EvidenceGalleryHandler:
    """After every validation epoch, draw the first ``num_images`` validation images with the
    evidence maps of their predicted class, save ``gallery_dir/epoch_XXX.png`` and log it into
    the MLflow run ``run_id`` at ``tracking_uri`` (None: disk only) as the MLflow image
    ``evidence_gallery`` with the epoch as its step, so the run's images in MLflow's UI step
    through the epochs with a slider.

    The images are taken from the evaluator's own batches, so they are exactly what it scored.
    Maps are drawn in float32, outside any autocast. A resumed training draws again the epochs
    between its last saved state and the interruption: an epoch the run holds an image of already
    is not logged twice.
    """

    def __init__(
        self,
        network: ImageClassifier,
        gallery_dir: str | Path,
        num_images: int = 8,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        enabled: bool = True,
    ):
        # the gallery's forward pass runs on rank 0 alone: through DDP it would wait for the other ranks
        self.network = network.module if isinstance(network, DistributedDataParallel) else network
        self.gallery_dir = Path(gallery_dir)
        self.num_images = num_images
        self.tracking = (tracking_uri, run_id) if tracking_uri and run_id else None
        self.enabled = enabled
        self._images: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._logged: set[int] | None = None  # the epochs the run holds a gallery of

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._draw)

    def _reset(self, engine: Engine) -> None:
        self._images, self._labels = [], []

    def _collect(self, engine: Engine) -> None:
        have = sum(len(x) for x in self._images)
        if have >= self.num_images:
            return
        items = engine.state.batch[: self.num_images - have]  # MONAI engines decollate: one dict per image
        self._images.append(torch.stack([torch.as_tensor(it["image"]).detach().cpu() for it in items]))
        self._labels.append(torch.stack([torch.as_tensor(it["label"]).detach().cpu() for it in items]).reshape(-1))

    def _draw(self, engine: Engine) -> None:
        if not self._images:
            return
        images, labels = torch.cat(self._images), torch.cat(self._labels)
        device = next(self.network.parameters()).device
        was_training = self.network.training
        self.network.eval()
        with torch.no_grad():
            logits, maps = self.network.forward_with_maps(images.as_subclass(torch.Tensor).to(device))
        self.network.train(was_training)
        path = self.gallery_dir / f"epoch_{engine.state.epoch:03d}.png"
        save_evidence_gallery(path, images, maps.float().cpu(), labels, logits.float().softmax(1).cpu(),
                              title=f"validation epoch {engine.state.epoch}")
        if self.tracking:
            try:
                if self._logged is None:
                    self._logged = set(image_steps(tracking_client(self.tracking[0]), self.tracking[1], "evidence_gallery"))
                if engine.state.epoch not in self._logged:
                    log_image(*self.tracking, path, key="evidence_gallery", step=engine.state.epoch)
                    self._logged.add(engine.state.epoch)
            except Exception as err:  # tracking must never stop training
                logger.warning("could not log %s to MLflow: %s", path.name, err)


class SystemMetrics:
    """MLflow's system metrics monitor over a training: CPU and memory use, disk, network and, with
    ``nvidia-ml-py`` on an NVIDIA GPU, GPU use and memory, logged into run ``run_id`` as
    ``system/...`` every ``sampling_interval`` seconds (the step counts the samples) from the
    engine's start to its end.

    MLflow starts its monitor with ``mlflow.start_run`` when system metrics logging is enabled; our
    runs are created by id and logged by MONAI's handler through a client, so the monitor is started
    here on the run's id. ``resume``: continue the steps of a resumed run. Enable it on one process
    (rank 0 under torchrun): each would log the same machine's figures into the same run.
    """

    def __init__(self, tracking_uri: str | None, run_id: str | None, sampling_interval: float = 10.0,
                 resume: bool = False, enabled: bool = True):
        self.tracking_uri = prepared_uri(tracking_uri) if tracking_uri else None
        self.run_id = run_id
        self.sampling_interval = sampling_interval
        self.resume = resume
        self.enabled = enabled and bool(tracking_uri and run_id)
        self.monitor = None

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self.start)
            engine.add_event_handler(Events.COMPLETED, self.finish)

    def start(self, engine: Engine | None = None) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        try:
            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.sampling_interval,
                                                resume_logging=self.resume, tracking_uri=self.tracking_uri)
            self.monitor.start()
        except Exception as err:  # tracking must never stop training
            logger.warning("no system metrics for this run: %s", err)
            self.monitor = None

    def finish(self, engine: Engine | None = None) -> None:
        """Stop sampling and log what is waiting, with one last sample (a training that raises leaves
        the monitor's daemon thread to end with the process)."""
        if self.monitor is None:
            return
        monitor, self.monitor = self.monitor, None
        monitor.finish()
        # MLflow's monitor drops the samples of its last, unfinished interval: without this a training
        # shorter than one interval would have no system metrics at all
        try:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as err:  # tracking must never stop training
            logger.warning("could not log the last system metrics: %s", err)


class TrainingRunTestMetrics:
    """When an evaluation of a checkpoint ends, log its metrics also into the MLflow run of the
    training that wrote the checkpoint (``run.json`` in its folder), as ``<prefix><metric>``
    (``test_auc``, ``test_accuracy``), so that the training runs can be sorted and compared by their
    test scores; the training run is tagged with the evaluation run's id (``test_run_id``). Without
    a training run in the store (weights from elsewhere) it logs a line and nothing else.
    """

    def __init__(self, tracking_uri: str | None, checkpoint: str, evaluation_run_id: str | None = None,
                 prefix: str = "test_", enabled: bool = True):
        self.tracking_uri, self.checkpoint, self.evaluation_run_id = tracking_uri, checkpoint, evaluation_run_id
        self.prefix, self.enabled = prefix, enabled and bool(tracking_uri)

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.COMPLETED, self.log)

    def log(self, engine: Engine) -> None:
        import time

        from mlflow.entities import Metric, RunTag

        client = tracking_client(self.tracking_uri)
        training = training_run_tags(client, self.checkpoint).get("training_run_id")
        if training is None:
            return
        now = int(1000 * time.time())
        metrics = [Metric(self.prefix + key, float(value), now, 0) for key, value in engine.state.metrics.items()
                   if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1)]
        tags = [RunTag(f"{self.prefix}run_id", self.evaluation_run_id)] if self.evaluation_run_id else []
        client.log_batch(training, metrics=metrics, tags=tags)


class MLflowRunHandler(MLFlowHandler):
    """MONAI's MLFlowHandler, logging into the run ``run_id`` and recording each step of a metric once.

    MONAI's handler finds its run by searching the experiment for an unfinished run of the same name,
    so trainings started in the same second (names to the second) wrote into one run. Here the run
    is created (or reopened, to resume) before training, by ``bundle.runs.start_training_run``, and
    handed over by id; everything else is MONAI's. A resumed training computes again the steps
    between its last saved state and the interruption: a (metric, step) the run already holds is
    not logged again (under deterministic training the recomputed value is the same one).
    The SQLite busy timeout of ``bundle.tracking.prepared_uri`` applies to ``tracking_uri``, which
    is used even when ``$MLFLOW_TRACKING_URI`` is set (the config resolves that one itself).
    """

    def __init__(self, run_id: str | None = None, tracking_uri: str | None = None, **kwargs):
        super().__init__(tracking_uri=prepared_uri(tracking_uri) if tracking_uri else None, **kwargs)
        if tracking_uri:
            self.client = tracking_client(tracking_uri)
        self.run_id = run_id
        self._recorded: dict[str, set[int]] | None = None

    def start(self, engine: Engine) -> None:
        if self.cur_run is None and self.run_id:
            self.cur_run = self.client.get_run(self.run_id)
        if self._recorded is None and self.cur_run is not None:
            run_id = self.cur_run.info.run_id
            self._recorded = {key: {m.step for m in self.client.get_metric_history(run_id, key)}
                              for key in self.client.get_run(run_id).data.metrics}
        super().start(engine)

    def _log_metrics(self, metrics: dict, step: int | None = None) -> None:
        recorded = self._recorded or {}
        fresh = {k: v for k, v in flatten_dict(metrics).items() if (step or 0) not in recorded.get(k, ())}
        if fresh:
            super()._log_metrics(fresh, step=step)


class TrainingProgress:
    """A progress bar (tqdm, through ignite) with epoch, iteration, loss and iterations per second."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        from ignite.handlers import ProgressBar

        ProgressBar(persist=True).attach(engine, output_transform=lambda output: {"loss": _first_loss(output)})


def _first_loss(output) -> float:
    item = output[0] if isinstance(output, (list, tuple)) else output
    return float(item["loss"])
