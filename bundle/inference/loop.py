"""The run loop: decode and prepare in DataLoader workers, predict in batches in this thread, put each
input's maps back on its grid, and hand it to the configured writers in writer processes
(``bundle.inference.writing``), so decoding and writing overlap the forward pass. A plain loop
rather than a MONAI evaluator: each input carries its own geometry and source files, which MONAI's
collate and postprocessing would flatten away."""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from monai.utils import TraceKeys

from bundle.inference.dataset import InferenceDataset, collate, network_image, plain_reason
from bundle.inference.tables import InferenceResult
from bundle.inference.writing import WriterPool
from bundle.inputs import InferenceInput, InputFailure
from bundle.writers.base import EvidenceCase

logger = logging.getLogger("bundle.inference")


def process(runner, inputs: list[InferenceInput], indices) -> tuple[list[tuple[int, InferenceResult]],
                                                                  list[tuple[int, InputFailure]]]:
    """Predict and write the outputs of ``inputs[i]`` for each i of ``indices`` with ``runner``'s model,
    loader settings and writers; return the results and the failures, each with its index into
    ``inputs``, in the order they completed."""
    indices = list(indices)
    results: list[tuple[int, InferenceResult]] = []
    failures: list[tuple[int, InputFailure]] = []
    loader = torch.utils.data.DataLoader(
        InferenceDataset([inputs[i] for i in indices], runner.load, runner.prepare, runner.spatial_dims),
        batch_size=runner.batch_size, num_workers=runner.num_workers, collate_fn=collate,
    )
    pending: deque[tuple[int, InferenceResult, Future]] = deque()
    # bounds the images, sources and maps held for the writers, while keeping every writer process busy
    # during the next batch's forward pass
    max_pending = max(2 * runner.batch_size, runner.writer_processes + runner.batch_size)

    def settle(limit: int) -> None:
        while len(pending) > limit:
            index, result, future = pending.popleft()
            try:
                result.outputs, skipped = future.result()
                results.append((index, result))
            except Exception as err:  # a writer failure is this input's; its partial files were never renamed
                failures.append((index, InputFailure(result.input.files[0], f"writing outputs failed ({plain_reason(err)})")))
                continue
            for note in result.notes:
                runner.note_once(logging.WARNING, f"source attribute {note} (listed per input in predictions.csv)")
            for reason in skipped:
                runner.note_once(logging.INFO, reason)

    with WriterPool(runner.writers, runner.output_dir, runner.completion, runner.writer_processes) as pool:
        for batch in loader:
            ok = [item for item in batch if "error" not in item]
            failures.extend((indices[item["index"]], InputFailure(inputs[indices[item["index"]]].files[0], item["error"]))
                            for item in batch if "error" in item)
            if not ok:
                continue
            probabilities, maps = runner.predict(torch.stack([item["image"].as_tensor() for item in ok]))
            for item, p, m in zip(ok, probabilities, maps):
                index = indices[item["index"]]
                result = InferenceResult(inputs[index], [float(v) for v in p], int(p.argmax()), notes=item["notes"])
                pending.append((index, result, submit(pool, runner, result, item, m)))
            settle(max_pending)
        settle(0)
    return results, failures


def submit(pool: WriterPool, runner, result: InferenceResult, item: dict, maps: torch.Tensor) -> Future:
    """Hand one input's case to the writers; a failure to build it is that input's (a failed future)."""
    try:
        return pool.submit(evidence_case(runner, result, item, maps))
    except Exception as err:
        failed = Future()
        failed.set_exception(err)
        return failed


def evidence_case(runner, result: InferenceResult, item: dict, maps: torch.Tensor) -> EvidenceCase:
    """What the writers get for one input: ``item`` from ``InferenceDataset``, its ``maps`` (C, S, S[, S])
    on the network grid, and the maps inverted onto the input's grid."""
    on_grid = on_input_grid(runner.prepare, item["image"], maps)
    return EvidenceCase(
        input=result.input, stem=output_stem(result.input, runner.input_dir), probabilities=result.probabilities,
        predicted_class=result.predicted_class,
        classes=tuple(range(maps.shape[0])) if runner.all_classes else (result.predicted_class,),
        evidence=on_grid.detach().cpu().numpy().astype(np.float32), affine=np.asarray(on_grid.affine, np.float64),
        network_image=network_image(item["image"]), network_maps=maps.numpy(), model=runner.model,
        class_names=runner.class_names, sources=item["sources"], source_display=item["display"], notes=item["notes"],
    )


def on_input_grid(prepare: Compose, image: MetaTensor, maps: torch.Tensor) -> MetaTensor:
    """Class maps (C, S, S[, S]) on the network grid -> the input's own grid, by inverting the
    preprocessing's spatial transforms (resize, pad) recorded on the prepared ``image``, with MONAI."""
    # The operations were recorded by a DataLoader worker's copy of ``prepare``. MONAI checks a record
    # against the inverting transform's id(), which a copy made by spawn or forkserver workers does not
    # share (MONAI only falls back to class names under a global "spawn"); the records come from this
    # same pipeline, so the id check is switched off (TraceKeys.NONE) rather than the order of ops.
    operations = [{**op, TraceKeys.ID: TraceKeys.NONE} for op in image.applied_operations]
    tracked = MetaTensor(maps, meta=dict(image.meta), applied_operations=operations)
    return prepare.inverse({"image": tracked})["image"]


def output_stem(source: InferenceInput, input_dir: Path) -> str:
    """The file-name stem of an input's outputs: its path under the input folder, separators as "__"."""
    where = source.files[0] if source.kind != "dicom-series" else source.files[0].parent
    relative = where.relative_to(input_dir) if where.is_relative_to(input_dir) else Path(where.name)
    name = str(relative).replace(os.sep, "__").removesuffix(".gz").removesuffix(".nii").removesuffix(".dcm")
    return name + (f"_frame{source.frame + 1}" if source.frame is not None else "")
