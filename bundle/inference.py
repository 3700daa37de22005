"""Run a trained classifier over a folder and write its evidence maps back out.

For every input found by ``bundle.inputs.discover_inputs``: a row in ``predictions.csv`` /
``predictions.json``, the evidence map of the predicted class as NIfTI on the input's own grid
(affine included), a PNG overlay, and for DICOM inputs an RGB Secondary Capture per image or slice
and, where the source has a Frame of Reference, a Parametric Map of the raw values. A bad input
becomes a row in ``failures.csv`` and the run goes on; the exit status says whether any failed.

Loading and preprocessing run in DataLoader workers, the model in the main thread and the
writers in a thread pool, so decoding and writing overlap the forward pass. This is a plain loop
rather than a MONAI evaluator because each input carries its own geometry and source files, which
MONAI's collate and postprocessing would have to flatten away.

Under torchrun (``configs/multi_gpu_inference.json``) each process takes a shard of the inputs and
process 0 merges the tables: see ``EvidenceInference._run_shard`` and docs/scaling.md.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import sys
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
import torch.distributed as dist
from monai.data import MetaTensor
from monai.transforms import Compose
from monai.utils import TraceKeys
from PIL import Image
from torch.nn import functional as F

from bundle.checkpoints import load_checkpoint, weights_digest
from bundle.inputs import InferenceInput, InputFailure, discover_inputs
from bundle.networks.classifier import ImageClassifier
from bundle.visualize import display_plane
from bundle.writers import ModelIdentity, ParametricMapNotApplicable, ParametricMapWriter, SecondaryCaptureWriter, atomic_write
from bundle.writers.secondary_capture import blend_evidence
from transforms.dicom import frame_slices, image_description, is_enhanced_volume

logger = logging.getLogger(__name__)

SHARDS_DIR = ".shards"  # under output_dir: each process's results until process 0 merges them


class InputsFailed(SystemExit):
    """Some inputs failed: ends ``python -m monai.bundle run`` with status 2 after all outputs are written.

    A SystemExit, like ``bundle.data.DatalistError``, so the config machinery does not wrap it.
    """

    def __init__(self, failed: int, total: int, failures_csv: Path):
        self.message = f"{failed} of {total} inputs could not be processed: see {failures_csv}"
        super().__init__(2)  # an integer status prints nothing: run() writes the message to stderr


class InferenceDataset(torch.utils.data.Dataset):
    """Loads and prepares one input per item; a failure becomes an item with an ``error`` (not an exception).

    ``load`` is the config's ``LoadImaged`` (a DICOM file, a series folder or a NIfTI file) and
    ``prepare`` the rest of the deterministic preprocessing, which must keep MetaTensors so that
    the evidence map can be inverted back onto the input's grid.
    """

    def __init__(self, inputs: list[InferenceInput], load, prepare: Compose, spatial_dims: int):
        self.inputs = inputs
        self.load = load
        self.prepare = prepare
        self.spatial_dims = spatial_dims

    def __len__(self) -> int:
        return len(self.inputs)

    def _loaded(self, item: InferenceInput) -> dict:
        if item.kind == "dicom-frame":
            return {"image": _dicom_frame(item.files[0], item.frame)}
        if item.kind == "dicom-series":
            # the series' own files only: its folder may hold other series (MONAI stacks a whole folder)
            with tempfile.TemporaryDirectory() as folder:
                for i, path in enumerate(item.files):
                    os.symlink(path.resolve(), Path(folder) / f"{i:05d}.dcm")
                return self.load({"image": folder})
        return self.load({"image": str(item.files[0])})

    def __getitem__(self, index: int) -> dict:
        try:
            loaded = self._loaded(self.inputs[index])
            dims = _spatial_dims(loaded["image"])
            if dims != self.spatial_dims:
                return {"index": index, "error": f"a {dims}D image cannot be the input of a {self.spatial_dims}D model"}
            data = self.prepare(loaded)
            image = data["image"]
            if not isinstance(image, MetaTensor) or not image.applied_operations:
                raise RuntimeError("preprocessing must keep MetaTensors (track_meta) to map evidence back")
            return {"index": index, "image": image, "display": _display(image)}
        except Exception as err:  # any load or preprocessing failure is this input's, not the run's
            return {"index": index, "error": _plain_reason(err)}


def _process_group() -> tuple[int, int]:
    """(rank, world size) of this process in torch.distributed's default group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(value):
    """``value`` as process 0 holds it, on every process (the others pass None)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _spatial_dims(image: MetaTensor) -> int:
    """Spatial dimensions of a loaded (not yet channel-first) image: a channel axis, if any, is marked."""
    channel_dim = image.meta.get("original_channel_dim", float("nan"))
    has_channel = not (isinstance(channel_dim, float) and math.isnan(channel_dim)) and channel_dim != "no_channel"
    return image.ndim - int(has_channel)


def _plain_reason(err: BaseException) -> str:
    """The innermost cause of an error: MONAI wraps a transform's exception in "applying transform ..."."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"


def _dicom_frame(path: Path, frame: int) -> MetaTensor:
    """One frame of a multi-frame DICOM file shaped as ``DicomReader`` shapes a single frame:
    (cols, rows[, samples]), modality LUT applied, with the same flat metadata."""
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array[frame]
    info = image_description(ds)
    if info["samples_per_pixel"] == 1:
        pixels = apply_modality_lut(pixels, ds)
    array = np.swapaxes(np.asarray(pixels, dtype=np.float32), 0, 1)
    channel_dim = -1 if array.ndim == 3 else float("nan")
    meta = {**info, "filename_or_obj": f"{path}#frame{frame + 1}", "original_channel_dim": channel_dim}
    return MetaTensor(torch.as_tensor(array), meta=meta)  # channel-last like the reader: EnsureChannelFirstd follows


def _display(image: MetaTensor) -> np.ndarray:
    """The network input (C, S, S[, S]) in [0, 1] as float32 numpy for overlays (channel 0)."""
    return image[0].detach().cpu().numpy().astype(np.float32)


def _collate(items: list[dict]) -> list[dict]:
    return items  # inputs keep their own geometry: batch them in the main loop


@dataclass
class InferenceResult:
    """What one input produced; ``outputs`` maps a kind ("nifti", "png", "sc", "pm") to its files."""

    input: InferenceInput
    probabilities: list[float]
    predicted_class: int
    outputs: dict[str, list[str]] = field(default_factory=dict)


class EvidenceInference:
    """Run ``network`` over ``input_dir`` and write predictions and evidence maps to ``output_dir``."""

    def __init__(
        self,
        network: ImageClassifier,
        load,
        prepare: Compose,
        input_dir: str,
        output_dir: str,
        ckpt_path: str,
        spatial_dims: int,
        model_name: str,
        model_version: str,
        class_names: dict | None = None,
        all_classes: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        writer_threads: int = 2,
        device: str | torch.device = "cpu",
        amp: bool = False,
        amp_dtype: torch.dtype | None = None,
        memory_format: torch.memory_format | None = None,
        tracking=None,
    ):
        self.network = network
        self.load = load
        self.prepare = prepare
        self.input_dir = Path(input_dir)
        self.output_dir = Path(output_dir)
        self.ckpt_path = Path(ckpt_path)
        self.spatial_dims = spatial_dims
        self.class_names = {int(k): str(v) for k, v in (class_names or {}).items()}
        self.all_classes = all_classes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.writer_threads = writer_threads
        self.device = torch.device(device)
        self.amp = amp
        self.amp_dtype = amp_dtype  # None: autocast's default for the device (float16 on CUDA)
        self.memory_format = memory_format  # channels_last on CUDA: what cuDNN's fastest convolutions take
        self.tracking = tracking
        self.model = ModelIdentity(model_name, model_version)
        self._notes: set[str] = set()

    def class_name(self, k: int) -> str:
        return self.class_names.get(k, f"class {k}")

    def run(self) -> tuple[list[InferenceResult], list[InputFailure]]:
        """Process every input; raise ``InputsFailed`` at the end if any failed (all else is written).

        In a process group (torchrun, ``configs/multi_gpu_inference.json``) each process takes its
        shard of the inputs and process 0 writes the merged tables and the MLflow run; see ``_run_shard``.
        """
        load_checkpoint(self.network, self.ckpt_path)
        self.model = ModelIdentity(self.model.name, self.model.version, weights_digest(self.ckpt_path))
        self.network.to(self.device, memory_format=self.memory_format or torch.preserve_format).eval()
        rank, world_size = _process_group()
        if world_size > 1:
            return self._run_shard(rank, world_size)
        inputs, failures = discover_inputs(self.input_dir, self.spatial_dims)
        logger.info("%d inputs, %d unusable files in the input folder", len(inputs), len(failures))
        processed, failed = self._process(inputs, range(len(inputs)))
        results = [result for _, result in processed]
        failures += [failure for _, failure in failed]
        self._write_tables(results, failures)
        if self.tracking is not None:
            self.tracking.log_inference(self, results, failures)
        if failures:
            error = InputsFailed(len(failures), len(results) + len(failures), self.output_dir / "failures.csv")
            print(error.message, file=sys.stderr)
            raise error
        return results, failures

    def _process(self, inputs: list[InferenceInput], indices) -> tuple[list[tuple[int, InferenceResult]],
                                                                         list[tuple[int, InputFailure]]]:
        """Predict and write the outputs of ``inputs[i]`` for each i of ``indices``; return the results
        and the failures, each with its index into ``inputs``, in the order they completed."""
        indices = list(indices)
        results: list[tuple[int, InferenceResult]] = []
        failures: list[tuple[int, InputFailure]] = []
        loader = torch.utils.data.DataLoader(
            InferenceDataset([inputs[i] for i in indices], self.load, self.prepare, self.spatial_dims),
            batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=_collate,
        )
        sc_writer = SecondaryCaptureWriter(self.model, self.class_names)
        pm_writer = ParametricMapWriter(self.model)
        pending: deque[tuple[int, InferenceResult, Future]] = deque()
        max_pending = 2 * self.batch_size  # bounds the images and maps held for the writers

        def settle(limit: int) -> None:
            while len(pending) > limit:
                index, result, future = pending.popleft()
                try:
                    future.result()
                    results.append((index, result))
                except Exception as err:  # a writer failure is this input's; its partial files were never renamed
                    reason = f"writing outputs failed ({type(err).__name__}: {err})"
                    failures.append((index, InputFailure(result.input.files[0], reason)))

        with ThreadPoolExecutor(max_workers=self.writer_threads) as pool:
            for batch in loader:
                ok = [item for item in batch if "error" not in item]
                failures += [(indices[item["index"]], InputFailure(inputs[indices[item["index"]]].files[0], item["error"]))
                             for item in batch if "error" in item]
                if not ok:
                    continue
                probabilities, maps = self.predict(torch.stack([item["image"].as_tensor() for item in ok]))
                for item, p, m in zip(ok, probabilities, maps):
                    index = indices[item["index"]]
                    result = InferenceResult(inputs[index], [float(v) for v in p], int(p.argmax()))
                    pending.append((index, result, pool.submit(self._write, result, item, m, sc_writer, pm_writer)))
                settle(max_pending)
            settle(0)
        return results, failures

    def _run_shard(self, rank: int, world_size: int) -> tuple[list[InferenceResult], list[InputFailure]]:
        """One process's part of a multi-process run.

        Process 0 discovers the inputs and sends the list to all, so every process shards the same list
        even if files arrive meanwhile; process r takes ``inputs[r::world_size]`` (a 3D series is one
        input, so it stays whole) and writes its outputs and ``output_dir/.shards/rank<r>.json``. After
        all have written, process 0 merges the shards into the one set of tables, in input order as a
        single process writes them, logs the one MLflow run and removes the shards. Every process then
        raises ``InputsFailed`` if any input failed anywhere, so that torchrun reports it.
        Returns this process's own results and failures (process 0: the merged ones).
        """
        inputs, unusable = _broadcast(discover_inputs(self.input_dir, self.spatial_dims) if rank == 0 else None)
        mine = range(rank, len(inputs), world_size)
        logger.info("process %d of %d: %d of %d inputs (%d unusable files in the input folder)", rank, world_size,
                    len(mine), len(inputs), len(unusable))
        processed, failed = self._process(inputs, mine)
        shard_path = self.output_dir / SHARDS_DIR / f"rank{rank}.json"
        with atomic_write(shard_path) as tmp:  # a process that dies leaves no half-written shard
            tmp.write_text(json.dumps({
                "results": [{"index": i, "probabilities": r.probabilities, "predicted_class": r.predicted_class,
                             "outputs": r.outputs} for i, r in processed],
                "failures": [{"index": i, "path": str(f.path), "reason": f.reason} for i, f in failed],
            }))
        # every shard is written; on CUDA the barrier's tensor goes on this process's GPU, not GPU 0
        dist.barrier(device_ids=[torch.cuda.current_device()] if self.device.type == "cuda" else None)
        if rank == 0:
            results, failures = self._merge_shards(inputs, unusable, world_size)
            self._write_tables(results, failures)
            if self.tracking is not None:
                self.tracking.log_inference(self, results, failures)
            if failures:  # printed now: torchrun stops the other processes as soon as one exits with status 2
                print(InputsFailed(len(failures), len(results) + len(failures), self.output_dir / "failures.csv").message,
                      file=sys.stderr, flush=True)
        else:
            results, failures = [result for _, result in processed], [failure for _, failure in failed]
        # process 0 sends the totals only when all is written: a process that ended earlier with status 2
        # would make torchrun stop process 0 before its tables were written
        failed_total, total = _broadcast((len(failures), len(results) + len(failures)) if rank == 0 else None)
        if failed_total:
            raise InputsFailed(failed_total, total, self.output_dir / "failures.csv")
        return results, failures

    def _merge_shards(self, inputs: list[InferenceInput], discovery_failures: list[InputFailure],
                      world_size: int) -> tuple[list[InferenceResult], list[InputFailure]]:
        """Read ``.shards/rank<r>.json`` of every process, delete them, and return all results and
        failures in input order (the folder's unusable files first), as a single process lists them."""
        results: list[tuple[int, InferenceResult]] = []
        failures: list[tuple[int, InputFailure]] = []
        shards = [self.output_dir / SHARDS_DIR / f"rank{r}.json" for r in range(world_size)]
        for path in shards:
            shard = json.loads(path.read_text())
            results += [(r["index"], InferenceResult(inputs[r["index"]], r["probabilities"], r["predicted_class"],
                                                     r["outputs"])) for r in shard["results"]]
            failures += [(f["index"], InputFailure(Path(f["path"]), f["reason"])) for f in shard["failures"]]
        for path in shards:
            path.unlink()
        with contextlib.suppress(OSError):  # other files in it are not ours to delete
            shards[0].parent.rmdir()
        results.sort(key=lambda pair: pair[0])
        failures.sort(key=lambda pair: pair[0])
        return [r for _, r in results], discovery_failures + [f for _, f in failures]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Softmax probabilities (B, C) and class maps (B, C, S, S[, S]) upsampled to the network input."""
        images = images.to(self.device, memory_format=self.memory_format or torch.preserve_format)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp and self.device.type == "cuda"):
            logits, maps = self.network.forward_with_maps(images)
        mode = "bilinear" if maps.ndim == 4 else "trilinear"
        maps = F.interpolate(maps.float(), size=images.shape[2:], mode=mode, align_corners=False)
        return logits.float().softmax(1).cpu().numpy(), maps.cpu()

    def _on_input_grid(self, item: dict, maps: torch.Tensor) -> MetaTensor:
        """Class maps (C, S, S[, S]) on the network grid -> the input's own grid, by inverting the
        preprocessing's spatial transforms (resize, pad) with MONAI."""
        image = item["image"]
        # The operations were recorded by a DataLoader worker's copy of ``prepare``. MONAI checks a record
        # against the inverting transform's id(), which a copy made by spawn or forkserver workers does not
        # share (MONAI only falls back to class names under a global "spawn"); the records come from this
        # same pipeline, so the id check is switched off (TraceKeys.NONE) rather than the order of ops.
        operations = [{**op, TraceKeys.ID: TraceKeys.NONE} for op in image.applied_operations]
        tracked = MetaTensor(maps, meta=dict(image.meta), applied_operations=operations)
        return self.prepare.inverse({"image": tracked})["image"]

    def _write(self, result: InferenceResult, item: dict, maps: torch.Tensor, sc_writer, pm_writer) -> None:
        classes = range(maps.shape[0]) if self.all_classes else [result.predicted_class]
        on_grid = self._on_input_grid(item, maps)
        stem = self._stem(result.input)
        sources = [pydicom.dcmread(f) for f in result.input.files] if result.input.kind.startswith("dicom") else []
        for k in classes:
            evidence = on_grid[k].detach().cpu().numpy().astype(np.float32)
            suffix = "" if k == result.predicted_class and not self.all_classes else f"_class{k}"
            result.outputs.setdefault("nifti", []).append(self._write_nifti(stem + suffix, evidence, on_grid.affine))
            if k == result.predicted_class:
                result.outputs["png"] = [self._write_png(stem, item["display"], maps[k].numpy())]
            if sources:
                self._write_dicom(result, sources, evidence, np.asarray(on_grid.affine), k, sc_writer, pm_writer)

    def _stem(self, source: InferenceInput) -> str:
        where = source.files[0] if source.kind != "dicom-series" else source.files[0].parent
        relative = where.relative_to(self.input_dir) if where.is_relative_to(self.input_dir) else Path(where.name)
        name = str(relative).replace(os.sep, "__").removesuffix(".gz").removesuffix(".nii").removesuffix(".dcm")
        return name + (f"_frame{source.frame + 1}" if source.frame is not None else "")

    def _write_nifti(self, stem: str, evidence: np.ndarray, affine: torch.Tensor) -> str:
        path = self.output_dir / "maps" / f"{stem}_evidence.nii.gz"
        with atomic_write(path) as tmp:
            image = nib.Nifti1Image(evidence, np.asarray(affine, dtype=np.float64))
            nib.save(image, str(tmp) + ".nii.gz")
            os.replace(str(tmp) + ".nii.gz", tmp)
        return str(path.relative_to(self.output_dir))

    def _write_png(self, stem: str, display: np.ndarray, evidence: np.ndarray) -> str:
        """Overlay on the network input: 3D volumes at the slice of maximum evidence."""
        plane, heat = display_plane(display, evidence)
        path = self.output_dir / "overlays" / f"{stem}.png"
        with atomic_write(path) as tmp:
            overlay = blend_evidence(np.repeat(plane[..., None], 3, axis=-1), heat)
            Image.fromarray(overlay).save(tmp, format="PNG", compress_level=1)  # level 1: a third of the CPU of 6
        return str(path.relative_to(self.output_dir))

    def _write_dicom(self, result: InferenceResult, datasets: list[pydicom.Dataset], evidence: np.ndarray,
                     affine: np.ndarray, k: int, sc_writer, pm_writer) -> None:
        """An SC per source image (or slice, or frame) of ``datasets`` (the input's files, read once for
        every class) and, with a Frame of Reference, one Parametric Map. ``evidence`` lies on the input's
        grid with RAS ``affine``."""
        source = result.input
        if source.kind == "dicom-multiframe":
            planes = _frame_planes(evidence, datasets[0], affine)  # (frames, rows, cols) in frame order
            images = [(datasets[0], f) for f in range(len(planes))]
        elif source.kind == "dicom-series":
            planes = _series_planes(evidence, datasets)  # (n, rows, cols) in file order
            images = [(ds, 0) for ds in datasets]
        else:
            planes = evidence.T[None]  # (cols, rows) as MONAI loads it -> (1, rows, cols)
            images = [(datasets[0], source.frame or 0)]
        for (ds, frame), plane in zip(images, planes):
            path = self.output_dir / "dicom" / "secondary_capture" / f"{sc_writer.sop_instance_uid(ds, k, frame)}.dcm"
            sc_writer.write(path, ds, plane, k, result.probabilities[k], frame=frame)
            result.outputs.setdefault("sc", []).append(str(path.relative_to(self.output_dir)))
        if source.kind == "dicom-frame":
            return  # a Parametric Map of one frame of a multi-frame object would need per-frame references
        name = self.class_name(k)
        path = self.output_dir / "dicom" / "parametric_map" / f"{pm_writer.sop_instance_uid(datasets, name)}.dcm"
        try:
            pm_writer.write(path, datasets, planes if len(planes) > 1 else planes[0], name)
        except ParametricMapNotApplicable as why:
            if str(why) not in self._notes:  # once per reason and run, not once per image
                self._notes.add(str(why))
                logger.info("%s", why)
            return
        result.outputs.setdefault("pm", []).append(str(path.relative_to(self.output_dir)))

    def _write_tables(self, results: list[InferenceResult], failures: list[InputFailure]) -> None:
        names = [self.class_name(k) for k in range(len(results[0].probabilities))] if results else []
        rows = [{
            "input": str(r.input.files[0].parent if r.input.kind == "dicom-series" else r.input.files[0]),
            "frame": "" if r.input.frame is None else r.input.frame + 1,
            "kind": r.input.kind,
            "predicted_class": r.predicted_class,
            "predicted_label": self.class_name(r.predicted_class),
            **{f"p_{name}": round(p, 6) for name, p in zip(names, r.probabilities)},
            "model": self.model.name,
            "model_version": self.model.version,
            "weights": self.model.weights_digest,
        } for r in results]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _write_csv(self.output_dir / "predictions.csv", rows, list(rows[0]) if rows else ["input"])
        with atomic_write(self.output_dir / "predictions.json") as tmp:
            tmp.write_text(json.dumps([{**row, "outputs": r.outputs} for row, r in zip(rows, results)], indent=1))
        _write_csv(self.output_dir / "failures.csv", [{"input": str(f.path), "reason": f.reason} for f in failures],
                   ["input", "reason"])


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


def _frame_planes(evidence: np.ndarray, ds: pydicom.Dataset, affine: np.ndarray) -> np.ndarray:
    """Volume (cols, rows, slices) of a multi-frame image -> (frames, rows, cols) in frame order: an
    enhanced image's frames by their plane positions, other multi-frame images (NM, US) frame by frame."""
    slices = frame_slices(ds, affine) if is_enhanced_volume(ds) else list(range(evidence.shape[-1]))
    if len(slices) != evidence.shape[-1] or sorted(slices) != list(range(evidence.shape[-1])):
        raise ValueError(f"the frames of the source do not map one to one onto the {evidence.shape[-1]} slices of the map")
    return np.stack([evidence[..., s].T for s in slices])


def _series_planes(evidence: np.ndarray, datasets: list[pydicom.Dataset]) -> np.ndarray:
    """Volume (cols, rows, n) as MONAI loaded a series -> (n, rows, cols) in the order of ``datasets``.

    MONAI's PydicomReader stacks a series in InstanceNumber order (a stable sort of the files it was
    given, which are ``datasets`` in this order), so slice k of the volume is the k-th of that sort.
    """
    if evidence.shape[-1] != len(datasets):
        raise ValueError(f"the loaded volume has {evidence.shape[-1]} slices, the series {len(datasets)} files")
    volume_order = sorted(range(len(datasets)), key=lambda i: int(datasets[i].get("InstanceNumber") or 0))
    slice_of_file = {file_index: k for k, file_index in enumerate(volume_order)}
    return np.stack([evidence[..., slice_of_file[i]].T for i in range(len(datasets))])
