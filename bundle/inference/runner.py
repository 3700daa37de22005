"""``EvidenceInference``: the object configs/inference.json builds and runs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose
from torch.nn import functional as F

from bundle.checkpoints import load_checkpoint, weights_digest
from bundle.files import remove_partial_files
from bundle.inference.completion import CompletionRecords
from bundle.inference.loop import process
from bundle.inference.sharding import process_group, run_shard
from bundle.inference.tables import InferenceResult, InputsFailed, summarize, write_tables
from bundle.inputs import InferenceInput, InputFailure, discover_inputs
from bundle.networks.classifier import EVIDENCE_MAPS, ImageClassifier, class_evidence
from bundle.writers import (
    EvidenceWriter,
    ModelIdentity,
    NiftiMapWriter,
    OverlayPngWriter,
    ParametricMapWriter,
    SecondaryCaptureWriter,
    StructuredReportWriter,
)

logger = logging.getLogger("bundle.inference")


class EvidenceInference:
    """Run ``network`` over ``input_dir`` and write predictions, and each input's outputs with ``writers``
    (default: NIfTI map, PNG overlay, Secondary Capture, Parametric Map, Structured Report), to ``output_dir``.

    ``resume``: skip inputs an earlier run into the same ``output_dir`` finished with the same model and
    writers (``bundle.inference.completion``). ``tracking`` gets an ``InferenceSummary`` at the end.
    ``evidence_map``: which map of each class is written (``bundle.networks.classifier.class_evidence``):
    "raw", the class evidence map whose spatial mean is the class's logit, or "contrast", that map
    minus the mean of the other classes' maps (the part of the evidence the softmax prediction fixes).
    ``writer_processes``: forked processes that write the outputs (``bundle.inference.writing``; 0: one
    thread of this process).
    """

    def __init__(self, network: ImageClassifier, load, prepare: Compose, input_dir: str, output_dir: str,
                 ckpt_path: str, spatial_dims: int, model_name: str, model_version: str,
                 class_names: dict | None = None, all_classes: bool = False, batch_size: int = 8,
                 num_workers: int = 0, writer_processes: int = 2, device: str | torch.device = "cpu",
                 amp: bool = False, amp_dtype: torch.dtype | None = None,
                 memory_format: torch.memory_format | None = None, writers: list[EvidenceWriter] | None = None,
                 resume: bool = True, tracking=None, evidence_map: str = "contrast"):
        self.network, self.load, self.prepare = network, load, prepare
        self.input_dir, self.output_dir, self.ckpt_path = Path(input_dir), Path(output_dir), Path(ckpt_path)
        self.spatial_dims = spatial_dims
        self.class_names = {int(k): str(v) for k, v in (class_names or {}).items()}
        self.all_classes = all_classes
        self.batch_size, self.num_workers, self.writer_processes = batch_size, num_workers, writer_processes
        self.device = torch.device(device)
        self.amp = amp
        self.amp_dtype = amp_dtype  # None: autocast's default for the device (float16 on CUDA)
        self.memory_format = memory_format  # channels_last on CUDA: what cuDNN's fastest convolutions take
        self.writers = list(writers) if writers is not None else [
            NiftiMapWriter(), OverlayPngWriter(), SecondaryCaptureWriter(), ParametricMapWriter(), StructuredReportWriter()]
        if evidence_map not in EVIDENCE_MAPS:
            raise ValueError(f"evidence_map must be one of {EVIDENCE_MAPS}, got {evidence_map!r}")
        self.resume = resume
        self.tracking = tracking
        self.model = ModelIdentity(model_name, model_version, evidence_map=evidence_map)
        self.completion: CompletionRecords | None = None
        self._noted: set[str] = set()

    def note_once(self, level: int, message: str) -> None:
        """Log ``message`` the first time this run meets it (a reason, not an input: no line per file)."""
        if message not in self._noted:
            self._noted.add(message)
            logger.log(level, "%s", message)

    def signature(self) -> str:
        """What makes two runs' outputs the same: the model, the classes written and named, the writers."""
        settings = [self.model.name, self.model.version, self.model.weights_digest, self.all_classes,
                    sorted(self.class_names.items()), [w.signature() for w in self.writers], self.model.evidence_map]
        return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]

    def run(self) -> tuple[list[InferenceResult], list[InputFailure]]:
        """Process every input; raise ``InputsFailed`` at the end if any failed (all else is written).

        In a process group (torchrun, ``configs/multi_gpu_inference.json``) each process takes its
        shard of the inputs and process 0 writes the merged tables and the MLflow run: see
        ``bundle.inference.sharding``.
        """
        load_checkpoint(self.network, self.ckpt_path)
        self.model = dataclasses.replace(self.model, weights_digest=weights_digest(self.ckpt_path))
        self.network.to(self.device, memory_format=self.memory_format or torch.preserve_format).eval()
        self.completion = CompletionRecords(self.output_dir, self.signature())
        rank, world_size = process_group()
        if world_size > 1:
            return run_shard(self, rank, world_size)
        inputs, unusable, resumed = self.plan()
        logger.info("%d inputs, %d unusable files in the input folder; %d done by an earlier run (skipped)",
                    len(inputs), len(unusable), len(resumed))
        processed, failed = process(self, inputs, [i for i in range(len(inputs)) if i not in resumed])
        results = [r for _, r in sorted([*resumed.items(), *processed], key=lambda pair: pair[0])]
        failures = unusable + [f for _, f in sorted(failed, key=lambda pair: pair[0])]
        self.finish(results, failures)
        return results, failures

    def plan(self) -> tuple[list[InferenceInput], list[InputFailure], dict[int, InferenceResult]]:
        """Before any process writes: remove the partial files an interrupted run left, find the inputs
        (and the unusable files), and those an earlier run completed (by index, from their records)."""
        removed = remove_partial_files(self.output_dir)
        if removed:
            logger.info("removed %d partial files an interrupted run left in %s", removed, self.output_dir)
        inputs, unusable = discover_inputs(self.input_dir, self.spatial_dims)
        resumed = {}
        for i, item in enumerate(inputs if self.resume else []):
            record = self.completion.lookup(item)
            if record is not None:
                resumed[i] = InferenceResult(item, record["probabilities"], record["predicted_class"],
                                             record["outputs"], record["notes"], resumed=True)
        return inputs, unusable, resumed

    def finish(self, results: list[InferenceResult], failures: list[InputFailure]) -> None:
        """Write the tables, hand the summary to tracking, and raise ``InputsFailed`` if any input failed."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_tables(self.output_dir, results, failures, self.class_names, self.model)
        if self.tracking is not None:
            self.tracking.log_inference(summarize(results, failures, self.output_dir, self.model, self.spatial_dims,
                                                  self.all_classes))
        if failures:  # printed now: under torchrun the other processes are stopped once one exits with status 2
            error = InputsFailed(len(failures), len(results) + len(failures), self.output_dir / "failures.csv")
            print(error.message, file=sys.stderr, flush=True)
            raise error

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Softmax probabilities (B, C) and class maps (B, C, S, S[, S]) (``evidence_map``'s kind) upsampled
        to the network input."""
        images = images.to(self.device, memory_format=self.memory_format or torch.preserve_format)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp and self.device.type == "cuda"):
            logits, maps = self.network.forward_with_maps(images)
        maps = class_evidence(maps.float(), self.model.evidence_map)
        mode = "bilinear" if maps.ndim == 4 else "trilinear"
        maps = F.interpolate(maps.float(), size=images.shape[2:], mode=mode, align_corners=False)
        return logits.float().softmax(1).cpu().numpy(), maps.cpu()
