"""Ignite/MONAI event handlers used by the bundle configs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from torch.nn.parallel import DistributedDataParallel

from bundle.networks.classifier import ImageClassifier
from bundle.tracking import log_artifact_to_active_run
from bundle.visualize import save_evidence_gallery

logger = logging.getLogger(__name__)


class EvidenceGalleryHandler:
    """After every validation epoch, draw the first ``num_images`` validation images with the
    evidence maps of their predicted class, save ``gallery_dir/epoch_XXX.png`` and log it into
    the current MLflow run (``tracking_uri`` / ``experiment_name`` / ``run_name``; None: disk only).

    The images are taken from the evaluator's own batches, so they are exactly what it scored.
    Maps are drawn in float32, outside any autocast.
    """

    def __init__(
        self,
        network: ImageClassifier,
        gallery_dir: str | Path,
        num_images: int = 8,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        enabled: bool = True,
    ):
        # the gallery's forward pass runs on rank 0 alone: through DDP it would wait for the other ranks
        self.network = network.module if isinstance(network, DistributedDataParallel) else network
        self.gallery_dir = Path(gallery_dir)
        self.num_images = num_images
        self.tracking = (tracking_uri, experiment_name, run_name) if tracking_uri and run_name else None
        self.enabled = enabled
        self._images: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

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
                log_artifact_to_active_run(*self.tracking, path, "evidence_gallery")
            except Exception as err:  # tracking must never stop training
                logger.warning("could not log %s to MLflow: %s", path.name, err)


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
