"""The whole DICOM inference run of configs/inference.json next to its forward pass, and what each of its
stages costs per image (loading, the forward pass, mapping the maps back to the input grid, each writer
with the time it waits in fsync, the completion record), all in one fresh process per model."""

from __future__ import annotations

import ast
import os
import resource
import shlex
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from monai.bundle import ConfigWorkflow

import bundle.files
from bundle.benchmark.cases import ROOT, train_config
from bundle.benchmark.harness import rss_mib, synchronize
from bundle.inference import InferenceDataset
from bundle.inference.completion import CompletionRecords
from bundle.inference.loop import evidence_case
from bundle.inference.tables import InferenceResult
from bundle.inputs import discover_inputs
from bundle.networks import classifier
from bundle.synthetic import make_dataset

# The demo's model options, as the Makefile's DEMO_MODEL passes them to `monai.bundle run`: `make bench` passes
# the Makefile's own value, so this default only serves a bare `python scripts/benchmark.py`.
DEMO_MODEL = "--backbone resnet18 --backbone_kwargs \"{'widen_factor': 0.125}\" --output_stride 8"


def parse_model_options(text: str) -> dict:
    """``--key value`` pairs as `monai.bundle run` takes them -> config overrides, values as Python literals
    where they parse as one (``{'widen_factor': 0.25}``, ``128``), else strings."""
    words = shlex.split(text)
    if len(words) % 2 or not all(w.startswith("--") for w in words[::2]):
        raise ValueError(f"model options must be --key value pairs, got {text!r}")
    options = {}
    for key, value in zip(words[::2], words[1::2]):
        try:
            options[key[2:]] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key[2:]] = value
    return options


def model_label(options: dict) -> str:
    defaults = train_config()
    backbone = options.get("backbone", defaults.get("backbone"))
    kwargs = "".join(f", {k} {v}" for k, v in options.get("backbone_kwargs", {}).items())
    size = options.get("image_size", defaults.get("image_size"))
    stride = f", output stride {options['output_stride']}" if options.get("output_stride") else ""
    return f"{backbone}{kwargs}{stride}, {size}^2"


def pipeline_models(demo: dict) -> dict[str, dict]:
    """The demo's model and the same network at full width (its ``widen_factor`` dropped): label ->
    {"role": "demo" / "full width", "options": config overrides}; each role has its target."""
    full = {**demo, "backbone_kwargs": {k: v for k, v in demo.get("backbone_kwargs", {}).items() if k != "widen_factor"}}
    models = {f"{model_label(demo)} (the demo's)": {"role": "demo", "options": demo}}
    if full != demo:
        models[f"{model_label(full)} (full width)"] = {"role": "full width", "options": full}
    return models


def inference_runner(input_dir: Path, output_dir: Path, ckpt: Path, device: str, **options):
    """``configs/inference.json``'s ``inference`` object with ``options`` as config overrides, tracking off."""
    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs/inference.json"), meta_file=str(ROOT / "configs/metadata.json"),
        workflow_type="infer", bundle_root=str(ROOT), input_dir=str(input_dir), output_dir=str(output_dir),
        ckpt_path=str(ckpt), device=f"$torch.device('{device}')", inference_tracking=None, **options,
    )
    workflow.initialize()
    return workflow.parser.get_parsed_content("inference")


def forward_only(runner, dataset: InferenceDataset, repeats: int) -> tuple[float, float]:
    """Images per second of ``runner.predict`` (forward with maps, upsampled) on the preprocessed images in
    memory, and the process's CPU milliseconds per image meanwhile (all torch threads)."""
    images = torch.stack([dataset[i]["image"].as_tensor() for i in range(len(dataset))]).to(runner.device)
    batch = runner.batch_size
    with torch.no_grad():
        runner.predict(images[:batch])  # warm-up
        synchronize(runner.device)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            for i in range(0, len(images), batch):
                runner.predict(images[i : i + batch])
        synchronize(runner.device)
    count = repeats * len(images)
    return count / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / count


def whole_run(runner, warm_up: int = 8) -> float:
    """Images per second of the whole run (discover, decode, preprocess, forward, write every output, record)
    in steady state: a first run over ``warm_up`` of the images, into another folder, pays the one-off
    start-up costs (imports, kernel selection, first writer calls) that a long folder amortises."""
    input_dir, output_dir = runner.input_dir, runner.output_dir
    if warm_up:
        with tempfile.TemporaryDirectory() as warm:
            for path in sorted(input_dir.glob("*.dcm"))[:warm_up]:
                (Path(warm) / path.name).symlink_to(path)
            runner.input_dir, runner.output_dir = Path(warm), output_dir.with_name(output_dir.name + "-warm-up")
            runner.run()
        runner.input_dir, runner.output_dir = input_dir, output_dir
    start = time.perf_counter()
    results, _ = runner.run()
    return len(results) / (time.perf_counter() - start)


@contextmanager
def fsync_clock():
    """Seconds this process spends in ``bundle.files``' fsync calls while the block runs. Instrumentation:
    the benchmark wraps the helper every atomic write calls, so writers are timed with and without it."""
    spent = [0.0]
    original = bundle.files._fsync

    def timed(*args, **kwargs):
        tick = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - tick

    bundle.files._fsync = timed
    try:
        yield spent
    finally:
        bundle.files._fsync = original


@contextmanager
def fsync_skipped():
    """Atomic writes without their fsync calls while the block runs, to measure what durability costs the
    pipeline. Instrumentation only: the bundle itself always syncs."""
    original = bundle.files._fsync
    bundle.files._fsync = lambda *args, **kwargs: None
    try:
        yield
    finally:
        bundle.files._fsync = original


class _Stopwatch:
    """Wall and this thread's CPU milliseconds per image of named stages."""

    def __init__(self):
        self.costs: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, stage: str, images: int = 1):
        wall, cpu = time.perf_counter(), time.thread_time()
        with fsync_clock() as fsync:
            yield
        cost = self.costs.setdefault(stage, {"ms": 0.0, "cpu_ms": 0.0, "fsync_ms": 0.0, "images": 0})
        cost["ms"] += 1000 * (time.perf_counter() - wall)
        cost["cpu_ms"] += 1000 * (time.thread_time() - cpu)
        cost["fsync_ms"] += 1000 * fsync[0]
        cost["images"] += images

    def per_image(self) -> dict[str, dict[str, float]]:
        return {stage: {k: round(v / c["images"], 2) for k, v in c.items() if k != "images"} for stage, c in self.costs.items()}


def stage_costs(runner, dataset: InferenceDataset, out: Path, forward: tuple[float, float]) -> dict[str, dict]:
    """Milliseconds per image (wall, this thread's CPU, of which waiting in fsync) of each stage of the run,
    one after the other in this thread, on ``dataset``'s inputs with the model's own maps: loading
    (decode, conformance, display, preprocessing), the forward pass (``forward_only``'s rate and CPU time),
    the maps on the input grid, each writer of ``runner.writers`` (a warm-up input first) and the
    completion record. Every file goes to a new name under ``out``, as in a run."""
    clock = _Stopwatch()
    items = []
    for i in range(len(dataset)):
        with clock("loading"):
            items.append(dataset[i])
    probabilities, maps = runner.predict(torch.stack([item["image"].as_tensor() for item in items]))
    cases = []
    for item, p, m in zip(items, probabilities, maps):
        result = InferenceResult(dataset.inputs[item["index"]], [float(v) for v in p], int(p.argmax()))
        with clock("maps to the input grid"):
            cases.append(evidence_case(runner, result, item, m))
    for writer in runner.writers:
        if writer.skip_reason(cases[0]):
            continue  # a Parametric Map needs a Frame of Reference, which the synthetic CR images have not
        writer.write(cases[0], out / "warm-up")  # the first call pays one-off costs (font, lazy imports)
        for case in cases[1:]:
            with clock(f"{type(writer).__name__} ({writer.kind})"):
                case.written.setdefault(writer.kind, []).extend(writer.write(case, out))
    records = CompletionRecords(out, runner.signature())
    for case in cases[1:]:
        outputs = {kind: [w.path for w in written] for kind, written in case.written.items()}
        with clock("completion record"):
            records.record(case.input, case.probabilities, case.predicted_class, outputs, case.notes)
    costs = clock.per_image()
    rate, cpu_ms = forward
    return {"loading": costs.pop("loading"),
            "forward pass": {"ms": round(1000 / rate, 2), "cpu_ms": round(cpu_ms, 2), "fsync_ms": 0.0}, **costs}


def measure_pipeline(input_dir: Path, work: Path, label: str, options: dict, device: str, passes: int = 3,
                     stage_images: int = 16) -> dict:
    """The pipeline next to its forward pass for one model, then its stage costs (call it in a fresh
    process: the peak memory is the pipeline run's; its child processes, DataLoader workers and writer
    processes, are counted apart, as the largest one's peak)."""
    ckpt = work / "model.pt"
    model_options = {k: v for k, v in options.items() if k in ("backbone", "backbone_kwargs", "spatial_dims", "output_stride")}
    torch.save(classifier(**model_options).state_dict(), ckpt)
    runner = inference_runner(input_dir, work / "out", ckpt, device, **options)
    full = whole_run(runner)  # its run() loads the checkpoint the forward-only timing then uses
    runner.output_dir = work / "out-without-fsync"
    with fsync_skipped():
        unsynced = whole_run(runner, warm_up=0)
    cuda = runner.device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(runner.device) / 2**20 if cuda else rss_mib()
    inputs, _ = discover_inputs(input_dir, runner.spatial_dims)
    dataset = InferenceDataset(inputs, runner.load, runner.prepare, runner.spatial_dims)
    forward = forward_only(runner, dataset, passes)
    few = InferenceDataset(inputs[: stage_images + 1], runner.load, runner.prepare, runner.spatial_dims)
    return {"model": label, "options": options, "pipeline_images_per_s": round(full, 2),
            "forward_images_per_s": round(forward[0], 2), "ratio": round(full / forward[0], 3),
            "without_fsync_images_per_s": round(unsynced, 2),
            "batch_size": runner.batch_size, "num_workers": runner.num_workers, "writer_processes": runner.writer_processes,
            "torch_threads": torch.get_num_threads(), "cores": os.cpu_count(), "peak_mib": round(peak, 1),
            "loader_worker_peak_mib": None if cuda else round(rss_mib(resource.RUSAGE_CHILDREN), 1),
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "stages_ms_per_image": stage_costs(runner, few, work / "stages", forward)}


def measure_pipelines(run: Callable, images: int, device: str, models: dict[str, dict], passes: int = 3,
                      image_rows: int | None = None, log: Callable = print) -> list[dict]:
    """Every model of ``models`` (``pipeline_models``' form) through the pipeline on ``images`` synthetic CR
    DICOM files, each in a fresh process from ``run``."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_dataset(tmp / "data", dims=2, n=images, seed=11, size=image_rows)
        for i, (label, model) in enumerate(models.items()):
            (tmp / f"work-{i}").mkdir()
            rows.append({"role": model.get("role"), **run(measure_pipeline, tmp / "data" / "images", tmp / f"work-{i}",
                                                          label, model["options"], device, passes)})
            log(f"pipeline {label}: {rows[-1]['pipeline_images_per_s']} images/s, forward only "
                f"{rows[-1]['forward_images_per_s']}, ratio {rows[-1]['ratio']}", flush=True)
    return rows
