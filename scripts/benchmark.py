"""Benchmark SoftCAM against the black box it replaces, each figure a ratio to its reference, all from one run.

- **forward**: SoftCAM ``forward_with_maps`` (logits and evidence maps) vs the black box's ``forward`` (logits);
- **maps**: SoftCAM's evidence map vs Grad-CAM, Grad-CAM++, LayerCAM and Score-CAM maps of the black box
  (``bundle.explain.methods.make_explainer``), per image: how many times cheaper SoftCAM is;
- **training step**: forward + loss + backward + optimiser step with the training config's loss and AdamW,
  SoftCAM head vs linear head on the same backbone;
- **pipeline**: the whole DICOM inference run of ``configs/inference.json`` vs its forward pass alone;
- **peak memory** of each; a profile of where the time goes; the training augmentations' throughput.

The cases compared with each other are timed side by side in one fresh process (forkserver with torch
preloaded where the platform has it, else spawn), their calls interleaved; peak memory comes from
``torch.cuda.max_memory_allocated`` on CUDA and, on CPU, from the resident set of one more fresh process
per case (``measure_memory``).

    python scripts/benchmark.py [--device cpu|cuda] [--sizes 224 512 96^3] [--backbones resnet18 resnet50]
                                [--threads N] [--quick] [--out docs/benchmarks.md]

On CUDA the cases use the training config's bf16 (or fp16) autocast and channels_last memory format.
Writes the markdown file and a JSON file beside it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import monai  # noqa: E402
from monai.bundle import ConfigParser, ConfigWorkflow  # noqa: E402

from bundle.explain.methods import make_explainer  # noqa: E402
from bundle.inference import InferenceDataset  # noqa: E402
from bundle.inputs import discover_inputs  # noqa: E402
from bundle.networks import classifier  # noqa: E402
from bundle.synthetic import make_dataset  # noqa: E402

TRAIN_CONFIG = ROOT / "configs" / "train.json"

MODELS = {
    "resnet18 (full width)": {"backbone": "resnet18", "backbone_kwargs": {}},
    "resnet18 (quarter width, the demo's)": {"backbone": "resnet18", "backbone_kwargs": {"widen_factor": 0.25}},
}
HEADS = ("linear", "softcam")  # the black box, the reference, first
POST_HOC = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "layercam": "LayerCAM", "scorecam": "Score-CAM"}
TARGETS = {"forward": 1.05, "train": 1.05, "pipeline": 0.7}  # SoftCAM / black box time at most; pipeline / forward rate at least
GPU_TARGETS = {"train": 2500, "forward": 8000}  # images/s, ResNet-50, 224^2, bf16, cached data, one H100
CUDA_BATCH = {(2, 224): 128, (2, 512): 24, (3, 96): 4}  # fits a ResNet-50 training step in 80 GB with bf16


@dataclass
class Setting:
    """One network and input: what every case of a setting shares."""

    backbone: str
    spatial_dims: int
    size: int
    batch_size: int = 1
    device: str = "cpu"
    amp_dtype: str | None = None  # "bfloat16" / "float16": autocast as the training config does on CUDA
    memory_format: str | None = None  # "channels_last" / "channels_last_3d"
    backbone_kwargs: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        width = "".join(f", {k} {v}" for k, v in self.backbone_kwargs.items())
        return f"{self.backbone}{width}, {self.size}^{self.spatial_dims}"

    @property
    def precision(self) -> str:
        return f"{self.amp_dtype} autocast" if self.amp_dtype else "float32"


def config_defaults(device: str, spatial_dims: int) -> dict:
    """What ``configs/train.json`` picks for ``device``: autocast dtype and memory format (None on CPU)."""
    parser = _train_config(device=torch.device(device), spatial_dims=spatial_dims)
    dtype, memory_format = parser.get_parsed_content("amp_dtype"), parser.get_parsed_content("memory_format")
    return {"amp_dtype": str(dtype).removeprefix("torch.") if dtype else None,
            "memory_format": str(memory_format).removeprefix("torch.") if memory_format else None}


def _train_config(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(TRAIN_CONFIG))
    for key, value in overrides.items():
        parser[key] = value  # objects (a network, a device) are taken as they are
    return parser


# --- cases: one callable per measured thing -------------------------------------------------------------


def _network(setting: Setting, head: str) -> torch.nn.Module:
    """The classifier with ``head``, on the device in the memory format; the same seed gives both heads the
    same backbone weights."""
    torch.manual_seed(0)
    net = classifier(setting.backbone, spatial_dims=setting.spatial_dims, head=head, backbone_kwargs=setting.backbone_kwargs)
    return net.to(setting.device, **_memory_format(setting))


def _memory_format(setting: Setting) -> dict:
    return {"memory_format": getattr(torch, setting.memory_format)} if setting.memory_format else {}


def _images(setting: Setting, count: int, size: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand((count, 1) + (size or setting.size,) * setting.spatial_dims, generator=generator)
    return x.to(setting.device).contiguous(**_memory_format(setting))


def _autocast(setting: Setting):
    if not setting.amp_dtype:
        return nullcontext()
    return torch.autocast(torch.device(setting.device).type, dtype=getattr(torch, setting.amp_dtype))


WARM_UP_SIZE = 32  # a first call on an input this small pays the process's one-off costs (library set-up, thread pools)


@dataclass
class Case:
    """One measured thing: ``call(images)`` on ``images``; ``warm_up`` a cheap first call on a small input."""

    call: Callable[[torch.Tensor], object]
    images: torch.Tensor
    warm_up: Callable[[], object]
    network: torch.nn.Module

    @property
    def feature_channels(self) -> int:
        return self.network.features.num_features


def build_case(setting: Setting, kind: str, name: str, scorecam_images: int = 1) -> Case:
    """``kind`` "forward" / "maps" / "train"; ``name`` a head ("linear", "softcam") or an explanation method
    ("softcam", "gradcam", "gradcampp", "layercam", "scorecam"), whose maps are of the black box but for "softcam"."""
    small = _images(setting, 1, WARM_UP_SIZE)
    if kind == "forward":
        net = _network(setting, name).eval()
        run = net.forward_with_maps if name == "softcam" else net  # SoftCAM: logits and evidence maps; black box: logits

        def forward(x):
            with torch.inference_mode(), _autocast(setting):
                return run(x)

        return Case(forward, _images(setting, setting.batch_size), lambda: forward(small), net)
    if kind == "maps":
        net = _network(setting, "softcam" if name == "softcam" else "linear")
        explainer = make_explainer(name, net)

        def explain(x):
            with _autocast(setting):
                return explainer(x, torch.zeros(len(x), dtype=torch.long))  # a given class: the prediction is not in the cost

        # Score-CAM's warm-up is a plain forward pass: on the small input it would still run D of them
        warm_up = (lambda: net.eval()(small)) if name == "scorecam" else (lambda: explain(small))
        count = scorecam_images if name == "scorecam" else setting.batch_size
        return Case(explain, _images(setting, count), warm_up, net)
    if kind == "train":
        net = _network(setting, name).train()
        parser = _train_config(network_def=net, network=net, head=name, device=torch.device(setting.device))
        loss_function, optimizer = parser.get_parsed_content("loss"), parser.get_parsed_content("optimizer")
        scaler = torch.amp.GradScaler(torch.device(setting.device).type, enabled=setting.amp_dtype == "float16")

        def step(x):
            optimizer.zero_grad(set_to_none=True)
            with _autocast(setting):
                loss = loss_function(net(x), (torch.arange(len(x)) % 2).to(x.device))
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        return Case(step, _images(setting, setting.batch_size), lambda: step(small), net)
    raise ValueError(f"unknown case kind {kind!r}")


# --- measuring in a fresh process --------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set of this process (or its largest finished child), MiB; ru_maxrss is KiB on Linux."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(who).ru_maxrss * scale / 2**20


def _timed_call(case: Case, device: torch.device) -> tuple[float, float | None]:
    """Seconds of one call and, on CUDA, the memory it allocated at its peak over what was in place (MiB)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    _synchronize(device)
    tick = time.perf_counter()
    case.call(case.images)
    _synchronize(device)
    seconds = time.perf_counter() - tick
    return seconds, (torch.cuda.max_memory_allocated(device) - before) / 2**20 if cuda else None


def time_cases(setting: Setting, kind: str, names: tuple[str, ...], repeats: int = 3, budget_s: float = 5.0,
               scorecam_images: int = 1) -> dict[str, dict]:
    """Time the cases ``names`` of one ``kind`` side by side in this process (call it in a fresh one).

    Each case first warms up on a small input. Then rounds call every case once, in alternating order,
    until ``repeats`` rounds follow the first (which still pays one-off costs at full size: cuDNN autotuning,
    first-touch allocations) or until another round would pass ``budget_s`` per case. A case's time is its
    fastest call after the first round (the first where that was the only one): the call least disturbed
    by the machine's other work, which the cases of a round share. On CUDA each call's peak memory is
    recorded too; on CPU ``measure_memory`` gives it, in a process of its own.
    """
    device = torch.device(setting.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as the configs' "initialize" does
    cases = {name: build_case(setting, kind, name, scorecam_images) for name in names}
    for case in cases.values():
        case.warm_up()
    calls: dict[str, list[tuple[float, float | None]]] = {name: [] for name in names}
    start = time.perf_counter()
    for round_ in range(repeats + 1):
        began = time.perf_counter()
        for name in names if round_ % 2 == 0 else names[::-1]:
            calls[name].append(_timed_call(cases[name], device))
        if time.perf_counter() - start + time.perf_counter() - began > budget_s * len(names):
            break
    results = {}
    for name, case in cases.items():
        timed = calls[name][1:] or calls[name]
        seconds, images = min(t for t, _ in timed), len(case.images)
        memory = [m for _, m in timed if m is not None]
        results[name] = {"seconds": seconds, "images": images, "images_per_s": images / seconds,
                         "seconds_per_image": seconds / images, "calls": len(calls[name]),
                         "feature_channels": case.feature_channels, "memory_mib": round(max(memory), 1) if memory else None}
    return results


def _release_freed_memory() -> str:
    """Make glibc serve every allocation from 64 KiB up by mmap and give it back when freed, so the resident
    set follows the live tensors; by default glibc raises that threshold as it goes and keeps freed blocks
    for reuse, and the peak then depends on the order of allocations rather than on what the call needs.
    Slows allocation (page faults on every call): for memory processes only, never while timing."""
    try:
        if ctypes.CDLL(None).mallopt(-3, 64 * 1024) == 1:  # M_MMAP_THRESHOLD; 1 is success
            return "glibc malloc, mmap threshold 64 KiB"
    except (OSError, AttributeError):
        pass
    return "the platform's default allocator"


def measure_memory(setting: Setting, kind: str, name: str, scorecam_images: int = 1) -> dict:
    """What one call of a case adds at its peak to the process's resident set (MiB) over the network,
    optimiser state and inputs already in place, after the warm-up. CPU; call it in a fresh process."""
    allocator = _release_freed_memory()
    case = build_case(setting, kind, name, scorecam_images)
    case.warm_up()
    before = _rss_mib()
    case.call(case.images)
    return {"memory_mib": round(max(_rss_mib() - before, 0.0), 1), "allocator": allocator}


PRELOAD = ["torch", "monai.bundle", "torchcam.methods", "captum.attr", "highdicom", "bundle.inference", "bundle.explain.methods"]


class FreshProcesses:
    """Runs each call in a new process: forkserver with this module (torch, MONAI, the bundle) preloaded
    where the platform has one, so a case costs a fork rather than the imports; spawn elsewhere.

    Inside, processes start as they would in this one (fork on Linux): the inference pipeline's DataLoader
    workers must share its transform objects, whose identities MONAI checks when inverting them.
    ``threads``: torch's intra-op threads in each process (None: torch's default, one per core).
    """

    def __init__(self, threads: int | None = None):
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        self.context = multiprocessing.get_context(method)
        if method == "forkserver":  # the server starts from the working directory's sys.path, so name the heavy imports too
            self.context.set_forkserver_preload(["__main__" if __name__ == "__main__" else __name__, *PRELOAD])
        self.initargs = (multiprocessing.get_start_method(), threads)
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=1, mp_context=self.context, max_tasks_per_child=1,
                                   initializer=_prepare_process, initargs=self.initargs)

    def __call__(self, function: Callable, *args, **kwargs):
        """``function(*args, **kwargs)`` in a new process; its result or its exception (a process that died,
        killed for memory say, raises ``BrokenProcessPool`` and the next call gets a new pool)."""
        try:
            return self.pool.submit(function, *args, **kwargs).result()
        except BrokenProcessPool:
            self.pool = self._new_pool()
            raise

    def __enter__(self) -> FreshProcesses:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown()


def _prepare_process(start_method: str, threads: int | None) -> None:
    multiprocessing.set_start_method(start_method, force=True)
    if threads:
        torch.set_num_threads(threads)


def model_flops(setting: Setting) -> dict[str, float]:
    """Floating-point operations per image of SoftCAM's forward pass and of a training step's forward and
    backward passes (torch's ``FlopCounterMode`` on the meta device: shapes only, nothing computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = classifier(setting.backbone, spatial_dims=setting.spatial_dims, backbone_kwargs=setting.backbone_kwargs)
    net = net.to("meta")
    x = torch.empty((1, 1) + (setting.size,) * setting.spatial_dims, device="meta")
    with FlopCounterMode(display=False) as forward:
        net.eval().forward_with_maps(x)
    with FlopCounterMode(display=False) as train:
        net.train()(x).sum().backward()
    return {"forward": forward.get_total_flops(), "train": train.get_total_flops()}


def scorecam_estimate(feature_channels: int, forward_seconds_per_image: float) -> float:
    """Seconds per image Score-CAM needs by its definition: one forward pass of the image and one of the
    image masked by each of the D feature maps (mask upsampling left out), at the black box's measured rate."""
    return (feature_channels + 1) * forward_seconds_per_image


def measure_setting(setting: Setting, run: Callable, repeats: int = 3, budget_s: float = 5.0,
                    scorecam_budget_s: float = 30.0, scorecam_images: int = 1, log: Callable = print) -> dict:
    """Every case of one setting with the ratios to their references: the black-box and SoftCAM forward
    passes timed side by side in one process, the maps in another, the training steps in a third; on CPU
    each case's memory in a process of its own.

    Score-CAM runs for real when its estimate (``scorecam_estimate``) fits ``scorecam_budget_s``;
    otherwise the estimate is reported, marked as such, without a memory figure.
    """
    def side_by_side(kind: str, names: tuple[str, ...]) -> dict[str, dict]:
        results = run(time_cases, setting, kind, names, repeats, budget_s, scorecam_images)
        for name, result in results.items():
            if result["memory_mib"] is None:
                result.update(run(measure_memory, setting, kind, name, scorecam_images))
            log(f"{setting.label}: {kind} {name}: {result['seconds']:.3f} s for {result['images']} images "
                f"(best of {result['calls']}), +{result['memory_mib']} MiB", flush=True)
        return results

    flops = run(model_flops, setting)
    forward = side_by_side("forward", HEADS)
    channels = forward["linear"]["feature_channels"]
    estimate = scorecam_estimate(channels, forward["linear"]["seconds_per_image"])
    affordable = estimate * scorecam_images <= scorecam_budget_s
    maps = side_by_side("maps", ("softcam", *[m for m in POST_HOC if m != "scorecam" or affordable]))
    for method in maps:
        maps[method]["estimated"] = False
    if not affordable:
        maps["scorecam"] = {"seconds_per_image": estimate, "estimated": True, "memory_mib": None}
        log(f"{setting.label}: maps scorecam: estimated {estimate:.1f} s per image, not run", flush=True)
    train = side_by_side("train", HEADS)
    softcam_map = maps["softcam"]["seconds_per_image"]
    return {
        "setting": asdict(setting), "label": setting.label, "precision": setting.precision, "feature_channels": channels,
        "gflop_per_image": {kind: flops[kind] / 1e9 for kind in ("forward", "train")},
        "forward": {**forward, "ratio": forward["softcam"]["seconds"] / forward["linear"]["seconds"],
                    "memory_ratio": _ratio(forward["softcam"]["memory_mib"], forward["linear"]["memory_mib"])},
        "maps": {**maps, "times_cheaper": {m: maps[m]["seconds_per_image"] / softcam_map for m in POST_HOC}},
        "train": {**train, "ratio": train["softcam"]["seconds"] / train["linear"]["seconds"],
                  "memory_ratio": _ratio(train["softcam"]["memory_mib"], train["linear"]["memory_mib"])},
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# --- where the time goes ------------------------------------------------------------------------------------

CATEGORIES = {  # by op (CPU) or kernel (CUDA) name, the first that matches; CPU ops inside the optimiser's step are "optimiser"
    "convolutions": ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "winograd", "xmma"),
    "batch norm": ("batch_norm", "batchnorm", "bn_"),
    "optimiser": ("optimizer.", "adam", "multi_tensor", "foreach"),
    "activations and adds": ("relu", "clamp", "threshold", "add"),
    "pooling": ("pool",),
}


def _category(name: str, ancestors: list[str] = ()) -> str:
    if any(a.startswith("Optimizer.") for a in ancestors):
        return "optimiser"
    return next((c for c, words in CATEGORIES.items() if any(w in name.lower() for w in words)), "other ops")


def _ancestors(event) -> list[str]:
    names = []
    while event.cpu_parent is not None:
        event = event.cpu_parent
        names.append(event.name)
    return names


def profile_case(setting: Setting, kind: str, name: str, calls: int = 1) -> dict:
    """Share of one case's wall time in each kind of op (torch.profiler; CPU: op self time, CUDA: kernel
    time) and outside them (Python, dispatch and, on CUDA, the GPU waiting for the host), after one warm-up."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(setting.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    case = build_case(setting, kind, name)
    case.warm_up()
    case.call(case.images)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _synchronize(device)
    with profile(activities=activities) as prof:
        tick = time.perf_counter()
        for _ in range(calls):
            case.call(case.images)
        _synchronize(device)
        wall_us = (time.perf_counter() - tick) * 1e6
    if device.type == "cuda":
        rows = [(e.key, e.self_device_time_total, _category(e.key)) for e in prof.key_averages()
                if e.device_type == DeviceType.CUDA]
    else:
        rows = [(e.name, e.self_cpu_time_total, _category(e.name, _ancestors(e))) for e in prof.events()]
    shares = dict.fromkeys([*CATEGORIES, "other ops"], 0.0)
    totals: dict[str, float] = {}
    for key, us, category in rows:
        shares[category] += us / wall_us
        totals[key] = totals.get(key, 0.0) + us
    shares["outside ops"] = max(0.0, 1.0 - sum(shares.values()))
    top = sorted(totals.items(), key=lambda r: -r[1])[:5]
    return {"case": f"{kind} {name}", "setting": setting.label, "timed": "GPU kernels" if device.type == "cuda" else "CPU ops",
            "wall_s": wall_us / 1e6 / calls, "images": len(case.images), "shares": shares,
            "top": [{"op": key, "share": us / wall_us} for key, us in top]}


def augmentation_rate(setting: Setting, images: int = 32) -> dict:
    """Images per second of the training config's random augmentations (``train#random_transforms``) over
    images already cached in memory, through a DataLoader with the config's workers: the data path that
    feeds a training step when the deterministic preprocessing is cached."""
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose

    parser = _train_config(image_size=setting.size, spatial_dims=setting.spatial_dims, device=torch.device(setting.device))
    workers = parser.get_parsed_content("num_workers")
    cached = [{"image": x} for x in _images(Setting(**{**asdict(setting), "device": "cpu", "memory_format": None}), images)]
    batch_size = max(1, min(setting.batch_size, images // max(1, 2 * workers)))  # every worker gets batches
    loader = DataLoader(Dataset(cached, Compose(parser.get_parsed_content("train#random_transforms"))),
                        batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:  # warm-up pass: starts the workers
        pass
    tick = time.perf_counter()
    count = sum(len(batch["image"]) for batch in loader)
    seconds = time.perf_counter() - tick
    return {"input": f"{setting.size}^{setting.spatial_dims}", "images": count, "num_workers": workers,
            "images_per_s": count / seconds}


# --- the whole inference pipeline (configs/inference.json) -------------------------------------------------


def inference_runner(input_dir: Path, output_dir: Path, ckpt: Path, device: str, **model):
    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs/inference.json"), meta_file=str(ROOT / "configs/metadata.json"),
        workflow_type="infer", bundle_root=str(ROOT), input_dir=str(input_dir), output_dir=str(output_dir),
        ckpt_path=str(ckpt), device=f"$torch.device('{device}')", inference_tracking=None, **model,
    )
    workflow.initialize()
    return workflow.parser.get_parsed_content("inference")


def forward_only(runner, input_dir: Path, batch_size: int, repeats: int) -> float:
    """Images per second of ``forward_with_maps`` on the preprocessed images, already in memory."""
    inputs, _ = discover_inputs(input_dir, runner.spatial_dims)
    dataset = InferenceDataset(inputs, runner.load, runner.prepare, runner.spatial_dims)
    images = torch.stack([dataset[i]["image"].as_tensor() for i in range(len(dataset))]).to(runner.device)
    runner.network.to(runner.device).eval()
    with torch.no_grad():
        runner.predict(images[:batch_size])  # warm-up
        _synchronize(runner.device)
        start = time.perf_counter()
        for _ in range(repeats):
            for i in range(0, len(images), batch_size):
                runner.predict(images[i : i + batch_size])
        _synchronize(runner.device)
    return repeats * len(images) / (time.perf_counter() - start)


def pipeline(runner, warm_up: int = 8) -> float:
    """Images per second of the whole run (discover, decode, preprocess, forward, write every output)
    in steady state: a first run over ``warm_up`` of the images pays the one-off start-up costs
    (imports, kernel selection, first writer calls) that a long folder amortises."""
    input_dir, output_dir = runner.input_dir, runner.output_dir
    with tempfile.TemporaryDirectory() as warm:
        for path in sorted(input_dir.glob("*.dcm"))[:warm_up]:
            (Path(warm) / path.name).symlink_to(path)
        runner.input_dir, runner.output_dir = Path(warm), output_dir.with_name(output_dir.name + "-warm-up")
        runner.run()
    runner.input_dir, runner.output_dir = input_dir, output_dir
    start = time.perf_counter()
    results, _ = runner.run()
    return len(results) / (time.perf_counter() - start)


def measure_pipeline(input_dir: Path, work: Path, label: str, model: dict, device: str, passes: int = 3) -> dict:
    """The pipeline next to its forward pass for one model (call it in a fresh process: the peak memory
    is the pipeline run's; DataLoader workers are counted apart, as the largest one's peak)."""
    ckpt = work / "model.pt"
    torch.save(classifier(model["backbone"], backbone_kwargs=model["backbone_kwargs"]).state_dict(), ckpt)
    runner = inference_runner(input_dir, work / "out", ckpt, device, **model)
    # the pipeline first: its run() loads the checkpoint the forward-only timing then uses
    full = pipeline(runner)
    cuda = runner.device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(runner.device) / 2**20 if cuda else _rss_mib()
    forward = forward_only(runner, input_dir, runner.batch_size, passes)
    return {"model": label, "pipeline_images_per_s": round(full, 2), "forward_images_per_s": round(forward, 2),
            "ratio": round(full / forward, 3), "batch_size": runner.batch_size, "num_workers": runner.num_workers,
            "writer_threads": runner.writer_threads, "peak_mib": round(peak, 1),
            "loader_worker_peak_mib": None if cuda else round(_rss_mib(resource.RUSAGE_CHILDREN), 1)}


def output_costs(input_dir: Path, out: Path, count: int = 16) -> dict[str, float]:
    """Milliseconds per image of each output writer of configs/inference.json alone (the writer plug-in
    objects an inference run uses, each writing through the atomic, fsynced file helper), single-threaded,
    on ``count`` sources loaded as the run loads them, with random maps."""
    from bundle.inference.loop import evidence_case
    from bundle.inference.tables import InferenceResult

    runner = inference_runner(input_dir, out, out / "unused.pt", "cpu")  # the checkpoint is read only by run()
    inputs, _ = discover_inputs(input_dir, runner.spatial_dims)
    dataset = InferenceDataset(inputs[:count], runner.load, runner.prepare, runner.spatial_dims)
    generator = torch.Generator().manual_seed(0)
    cases = []
    for item in (dataset[i] for i in range(len(dataset))):
        maps = torch.rand((2, *item["image"].shape[1:]), generator=generator)
        result = InferenceResult(inputs[item["index"]], [0.5, 0.5], 1)
        cases.append(evidence_case(runner, result, item, maps))
    costs = {}
    for writer in runner.writers:
        if writer.skip_reason(cases[0]):
            continue  # a Parametric Map needs a Frame of Reference, which the synthetic CR images have not
        writer.write(cases[0], out)  # the first call pays one-off costs (font, lazy imports) a long run amortises
        start = time.perf_counter()
        for case in cases:
            writer.write(case, out)
        costs[f"{type(writer).__name__} ({writer.kind})"] = round(1000 * (time.perf_counter() - start) / len(cases), 1)
    return costs


def measure_pipelines(run: Callable, images: int, device: str, passes: int = 3, models: dict = MODELS,
                      image_rows: int | None = None) -> tuple[list[dict], dict[str, float]]:
    """Every model of ``models`` through the pipeline on ``images`` synthetic CR DICOM files (the forward-only
    timing over ``passes`` passes), and the writers' costs."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_dataset(tmp / "data", dims=2, n=images, seed=11, size=image_rows)
        for i, (label, model) in enumerate(models.items()):
            (tmp / f"work-{i}").mkdir()
            rows.append(run(measure_pipeline, tmp / "data" / "images", tmp / f"work-{i}", label, model, device, passes))
            print(rows[-1], flush=True)
        costs = output_costs(tmp / "data" / "images", tmp)
    return rows, costs


# --- the run and its report ---------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """"224" or "224^2" -> (2, 224); "96^3" -> (3, 96)."""
    size, _, power = text.partition("^")
    dims = int(power or 2)
    if dims not in (2, 3):
        raise argparse.ArgumentTypeError(f"{text!r}: give N (2D), N^2 or N^3")
    return dims, int(size)


def make_settings(sizes: list[tuple[int, int]], backbones: list[str], device: str, batch_size: int | None = None,
                  backbone_kwargs: dict | None = None) -> list[Setting]:
    """One setting per backbone and size, with the training config's precision and memory format for ``device``."""
    settings = []
    for backbone in backbones:
        for dims, size in sizes:
            defaults = config_defaults(device, dims)
            batch = batch_size or (CUDA_BATCH.get((dims, size), 8) if device.startswith("cuda") else 1)
            settings.append(Setting(backbone, dims, size, batch, device, defaults["amp_dtype"], defaults["memory_format"],
                                    dict(backbone_kwargs or {})))
    return settings


def run_benchmark(settings: list[Setting], device: str = "cpu", repeats: int = 3, budget_s: float = 5.0,
                  scorecam_budget_s: float = 30.0, scorecam_images: int = 1, pipeline_images: int = 64,
                  pipeline_models: dict = MODELS, pipeline_image_rows: int | None = None, augmentation_images: int = 32,
                  profile_setting: Setting | None = None, threads: int | None = None) -> dict:
    """Measure everything and return the report (what ``write_markdown`` and the JSON file hold)."""
    load_before = os.getloadavg()
    started = time.perf_counter()
    with FreshProcesses(threads) as run:
        results = []
        for setting in settings:
            try:
                results.append(measure_setting(setting, run, repeats, budget_s, scorecam_budget_s, scorecam_images))
            except Exception as err:  # one setting out of memory, say: report it and measure the others
                print(f"{setting.label}: not measured: {type(err).__name__}: {err}", flush=True)
                results.append({"setting": asdict(setting), "label": setting.label, "error": f"{type(err).__name__}: {err}"})
        measured = [Setting(**r["setting"]) for r in results if "error" not in r]
        if not measured:
            raise RuntimeError("no setting could be measured: " + "; ".join(r["error"] for r in results))
        profiled = profile_setting or _gpu_target_setting(measured) or measured[0]
        profiles = [run(profile_case, profiled, "forward", "softcam"), run(profile_case, profiled, "train", "softcam")]
        loading = [run(augmentation_rate, s, augmentation_images if s.spatial_dims == 2 else max(2, augmentation_images // 8))
                   for s in _one_per_size(measured)]
        pipeline_rows, costs = measure_pipelines(run, pipeline_images, device, models=pipeline_models,
                                                 image_rows=pipeline_image_rows)
    for entry in loading:
        trained = [r for r in results if "error" not in r
                   and f"{r['setting']['size']}^{r['setting']['spatial_dims']}" == entry["input"]]
        entry["train_images_per_s"] = {r["label"]: r["train"]["softcam"]["images_per_s"] for r in trained}
    return {
        "date": time.strftime("%Y-%m-%d"), "device": _device_name(device, threads), "machine": platform.machine(),
        "load_average": {"start": [round(v, 2) for v in load_before], "end": [round(v, 2) for v in os.getloadavg()]},
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
        "torchcam": _version("torchcam"),
        "method": {"repeats": repeats, "budget_s": budget_s, "scorecam_budget_s": scorecam_budget_s,
                   "scorecam_images": scorecam_images},
        "settings": results, "profiles": profiles, "augmentation": loading, "gpu_targets": _gpu_targets(results, device),
        "pipeline": {"images": pipeline_images, "image": f"synthetic CR DICOM, resized to {_pipeline_sizes(pipeline_models)}",
                     "results": pipeline_rows, "output_ms_per_image": costs},
    }


def _pipeline_sizes(models: dict) -> str:
    default = _train_config().get("image_size")
    return ", ".join(f"{size} x {size}" for size in sorted({m.get("image_size", default) for m in models.values()}))


def _one_per_size(settings: list[Setting]) -> list[Setting]:
    first: dict[tuple[int, int], Setting] = {}
    for setting in settings:
        first.setdefault((setting.spatial_dims, setting.size), setting)
    return list(first.values())


def _is_gpu_target(setting: Setting) -> bool:
    return (setting.backbone, setting.spatial_dims, setting.size) == ("resnet50", 2, 224) and not setting.backbone_kwargs


def _gpu_target_setting(settings: list[Setting]) -> Setting | None:
    return next((s for s in settings if _is_gpu_target(s)), None)


def _gpu_targets(results: list[dict], device: str) -> dict | None:
    """ResNet-50 at 224^2: SoftCAM training and inference (logits + evidence maps) in images/s vs the GPU targets."""
    row = next((r for r in results if "error" not in r and _is_gpu_target(Setting(**r["setting"]))), None)
    if row is None:
        return None
    return {"on_gpu": device.startswith("cuda"), "precision": row["precision"], "batch_size": row["setting"]["batch_size"],
            "memory_format": row["setting"]["memory_format"] or "contiguous",
            "train_images_per_s": row["train"]["softcam"]["images_per_s"], "train_target": GPU_TARGETS["train"],
            "forward_images_per_s": row["forward"]["softcam"]["images_per_s"], "forward_target": GPU_TARGETS["forward"],
            "gflop_per_image": row["gflop_per_image"]}


def _device_name(device: str, threads: int | None) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), platform.processor())
    return f"CPU ({model or 'unknown'}), {os.cpu_count()} cores, torch {threads or torch.get_num_threads()} threads"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}" if seconds < 10 else f"{seconds:,.0f} s"


def _rate(images_per_s: float) -> str:
    """Three significant figures, thousands separated."""
    return f"{images_per_s:.3g}" if images_per_s < 1000 else f"{images_per_s:,.0f}"


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}" if value < 10 else f"{value:,.0f}"


def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f}"


PAIR_TABLE = [
    "| setting | batch | precision | black box (images/s) | SoftCAM (images/s) | time ratio | target "
    "| memory black box / SoftCAM (MiB) | memory ratio | GFLOP / image | SoftCAM GFLOP/s |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]


def _pair_row(row: dict, kind: str) -> str:
    """A table row for the black box and SoftCAM side by side, ``kind`` "forward" or "train"."""
    pair, gflop = row[kind], row["gflop_per_image"][kind]
    return (f"| {row['label']} | {row['setting']['batch_size']} | {row['precision']} | {_rate(pair['linear']['images_per_s'])} | "
            f"{_rate(pair['softcam']['images_per_s'])} | **{pair['ratio']:.3f}** | <= {TARGETS[kind]} | "
            f"{_mib(pair['linear']['memory_mib'])} / {_mib(pair['softcam']['memory_mib'])} | {_x(pair['memory_ratio'])} | "
            f"{gflop:,.1f} | {gflop * pair['softcam']['images_per_s']:,.1f} |")


def write_report(path: Path, report: dict) -> None:
    """The markdown file at ``path`` and the whole report as JSON beside it (same name, .json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(path, report)


def write_markdown(path: Path, report: dict) -> None:
    """docs/benchmarks.md from the report: one table per measurement, then what bounds each."""
    rows = report["settings"]
    pipe = report["pipeline"]
    method = report["method"]
    failed = [r for r in report["settings"] if "error" in r]
    rows = [r for r in rows if "error" not in r]
    sizes = sorted({(r["setting"]["spatial_dims"], r["setting"]["size"]) for r in rows})
    allocator = next((r["forward"]["linear"].get("allocator") for r in rows), None)
    memory = (f"CPU: growth of the resident set's peak (`ru_maxrss`) in a fresh process per case ({allocator}, so freed "
              "tensors leave the resident set)" if allocator else
              "CUDA: `torch.cuda.max_memory_allocated` over `memory_allocated` before the call")
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `{report.get('command', 'python scripts/benchmark.py')}` (all figures side by side from one run; "
        "re-run it to refresh).",
        "",
        f"- date: {report['date']}; device: {report['device']}; load average (1/5/15 min) "
        f"{' / '.join(map(str, report['load_average']['start']))} at the start, "
        f"{' / '.join(map(str, report['load_average']['end']))} at the end; the run took {report['minutes']} min",
        f"- torch {report['torch']}, MONAI {report['monai']}, torchcam {report['torchcam']}, Python {report['python']}",
        f"- inputs: random images at {', '.join(f'{s}^{d}' for d, s in sizes)}, one channel; backbones: "
        f"{', '.join(sorted({r['setting']['backbone'] for r in rows}))} as `bundle.networks.classifier` builds them "
        "(MONAI ResNets, first convolution at stride 1, so feature maps are 1/16 of the input); batch size and precision per row",
        "- timing: the cases compared (black box and SoftCAM forward; the five maps; the two training steps) run side by "
        "side in one fresh process: each warms up on a 32-pixel input, then rounds call every case once, in alternating "
        f"order, until {method['repeats']} rounds follow the first or another round would pass {method['budget_s']} s per "
        "case; a case's time is its fastest call after the first round (the first where that was the only one). Ratios "
        "are times, SoftCAM / reference.",
        f"- memory: what one call adds at its peak over the network, optimiser state and inputs in place, MiB; {memory}",
        "",
        *[f"- **not measured**: {r['label']}: {r['error']}" for r in failed],
        "## SoftCAM forward vs black-box forward",
        "",
        "SoftCAM `forward_with_maps` (logits and evidence maps) vs the black box's `forward` (logits), same backbone weights. "
        "GFLOP / image: what torch's `FlopCounterMode` counts for SoftCAM's forward pass (for the training step below, its "
        "forward and backward passes); SoftCAM GFLOP/s: that times SoftCAM's images/s.",
        "",
        *PAIR_TABLE,
    ]
    lines += [_pair_row(r, "forward") for r in rows]
    lines += [
        "",
        "## SoftCAM evidence maps vs post-hoc maps of the black box",
        "",
        "Milliseconds per image for the map of a given class through `bundle.explain.methods.make_explainer` (maps upsampled "
        "to the input, as every explainer returns them); for each post-hoc method, how many times SoftCAM's map is cheaper. "
        f"Score-CAM runs on {method['scorecam_images']} image(s); where its estimated cost passed "
        f"{method['scorecam_budget_s']} s it was not run and the figure (*est.*) is its definition's cost, D + 1 black-box "
        "forward passes per image (D feature channels) at the measured forward rate.",
        "",
        "| setting | SoftCAM (ms/image) | " + " | ".join(POST_HOC.values()) + " |",
        "| --- | --- | " + " | ".join("---" for _ in POST_HOC) + " |",
    ]
    for r in rows:
        m = r["maps"]
        cells = [f"{m['times_cheaper'][k]:,.1f}x ({_ms(m[k]['seconds_per_image'])}{' *est.*' if m[k].get('estimated') else ''})"
                 for k in POST_HOC]
        lines.append(f"| {r['label']} | {_ms(m['softcam']['seconds_per_image'])} | " + " | ".join(cells) + " |")
    lines += ["", "Memory of each map's computation (MiB):", "",
              "| setting | SoftCAM | " + " | ".join(POST_HOC.values()) + " |",
              "| --- | --- | " + " | ".join("---" for _ in POST_HOC) + " |"]
    for r in rows:
        m = r["maps"]
        memory = [_mib(m[k]["memory_mib"]) for k in ("softcam", *POST_HOC)]
        lines.append(f"| {r['label']} | " + " | ".join(memory) + " |")
    lines += [
        "",
        "## SoftCAM training step vs black-box training step",
        "",
        "Forward, loss, backward and optimiser step with `configs/train.json`'s loss (`bundle.losses.classification_loss`: "
        "SoftCAM's ElasticNet-regularised cross-entropy vs cross-entropy) and AdamW, on a batch already in memory.",
        "",
        *PAIR_TABLE,
    ]
    lines += [_pair_row(r, "train") for r in rows]
    lines += [
        "",
        "## Inference: whole DICOM pipeline vs forward pass",
        "",
        f"- inputs: {pipe['images']} {pipe['image']}",
        "- **pipeline**: `configs/inference.json` end to end: discover the folder, decode and preprocess in",
        "  DataLoader workers, forward pass with evidence maps, invert to the source grid, write NIfTI map,",
        "  PNG overlay, RGB Secondary Capture, predictions and failures tables (CR has no Parametric Map).",
        "- **forward only**: `forward_with_maps` + upsampling on the same preprocessed images held in memory.",
        "- both in steady state: the pipeline is timed on its second run (the first, on 8 of the images,",
        "  pays one-off start-up costs), the forward pass after one warm-up batch.",
        "- memory: the peak of the pipeline's process (resident set on CPU, allocated on CUDA) and of its largest loader worker.",
        "",
        "| model | pipeline (images/s) | forward only (images/s) | ratio | target | loader workers / writer threads "
        "| peak memory process / worker (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in pipe["results"]:
        lines.append(f"| {row['model']} | {row['pipeline_images_per_s']} | {row['forward_images_per_s']} | "
                     f"{row['ratio']} | >= {TARGETS['pipeline']} | {row['num_workers']} / {row['writer_threads']} | "
                     f"{_mib(row['peak_mib'])} / {_mib(row['loader_worker_peak_mib'])} |")
    lines += _gpu_target_lines(report["gpu_targets"])
    lines += _bounds_lines(report)
    path.write_text("\n".join(lines) + "\n")


def _gpu_target_lines(targets: dict | None) -> list[str]:
    lines = ["", "## GPU targets (ResNet-50, 224^2, bf16, cached data, one H100)", ""]
    if targets is None:
        return lines + ["ResNet-50 at 224^2 was not part of this run."]
    if not targets["on_gpu"]:
        lines += ["This run had no GPU: the figures below are the CPU's, for scale only; the targets apply to an H100 "
                  "(`--device cuda`, which also turns on the training config's bf16 autocast and channels_last).", ""]
    how = f"{targets['batch_size']} | {targets['precision']} / {targets['memory_format']}"
    gflop = targets["gflop_per_image"]
    return lines + [
        "| measurement | batch | precision / memory format | images/s | target (images/s) | the target in TFLOP/s |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| SoftCAM training step | {how} | {_rate(targets['train_images_per_s'])} | >= {targets['train_target']} | "
        f"{targets['train_target'] * gflop['train'] / 1000:.0f} |",
        f"| SoftCAM inference with evidence maps | {how} | {_rate(targets['forward_images_per_s'])} "
        f"| >= {targets['forward_target']} | {targets['forward_target'] * gflop['forward'] / 1000:.0f} |",
        "",
        f"MONAI's ResNet-50 as the bundle builds it takes {gflop['forward']:.1f} GFLOP per 224^2 image forward and "
        f"{gflop['train']:.1f} for a training step's forward and backward passes: its first convolution has stride 1, so "
        "every later layer sees 4 times the positions of torchvision's ResNet-50 (about 8 GFLOP forward; "
        "`--backbone_kwargs \"{'conv1_t_stride': 2}\"` builds that stem, with evidence maps of 7 x 7 instead of 14 x 14). "
        "The last column is the sustained rate the targets ask of the GPU.",
    ]


def _bounds_lines(report: dict) -> list[str]:
    """'What bounds it': the profile, the data path and the writers, with the conclusions the numbers support."""
    lines = ["", "## What bounds it", ""]
    columns = [*CATEGORIES, "other ops", "outside ops"]
    lines += [f"Share of wall time by kind of op (torch.profiler, one call after a warm-up; "
              f"{report['profiles'][0]['timed']} timed):", "",
              "| case | setting | wall (ms/call) | " + " | ".join(columns) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    for p in report["profiles"]:
        lines.append(f"| {p['case']} | {p['setting']} | {_ms(p['wall_s'])} | "
                     + " | ".join(f"{100 * p['shares'][c]:.0f} %" for c in columns) + " |")
    forward, train = report["profiles"]
    rows = [r for r in report["settings"] if "error" not in r]
    fw, tr = [r["forward"]["ratio"] for r in rows], [r["train"]["ratio"] for r in rows]
    over = sum(r > TARGETS["forward"] for r in fw) + sum(r > TARGETS["train"] for r in tr)
    head_macs = max(2 * r["feature_channels"] * (r["setting"]["size"] // 16) ** r["setting"]["spatial_dims"] for r in rows)
    gradient = [r["maps"]["times_cheaper"][m] for r in rows for m in ("gradcam", "gradcampp", "layercam")]
    scorecam = [r["maps"]["times_cheaper"]["scorecam"] for r in rows]
    held = [r["maps"][m]["memory_mib"] / r["maps"]["softcam"]["memory_mib"] for r in rows
            for m in ("gradcam", "gradcampp", "layercam") if r["maps"]["softcam"]["memory_mib"]] or [float("nan")]
    channels = ", ".join(sorted({f"{r['feature_channels']:,} for {r['setting']['backbone']}" for r in rows}))
    outside = "Python, dispatch" + (" and the GPU waiting for the host" if "GPU" in forward["timed"] else "")
    rates = {kind: [r["gflop_per_image"][kind] * r[kind]["softcam"]["images_per_s"] for r in rows]
             for kind in ("forward", "train")}
    lines += [
        "",
        f"- **SoftCAM vs the black box**: time ratios {min(fw):.3f} to {max(fw):.3f} for the forward pass and "
        f"{min(tr):.3f} to {max(tr):.3f} for the training step; {over} of {len(fw) + len(tr)} above the 1.05 target. "
        "Both share the backbone; SoftCAM's head is a 1x1 convolution with C x D x h x w multiply-adds "
        f"(at most {head_macs / 1e6:.2f} M here, for 2 classes) where the black box pools and applies a C x D layer, so "
        "the heads' difference is a vanishing share of a forward pass dominated by the backbone's convolutions: how far a "
        "ratio strays from 1 here is the noise the machine's other work leaves even in interleaved calls (load average above).",
        f"- **Where the time goes**: convolutions take {100 * forward['shares']['convolutions']:.0f} % of SoftCAM's forward "
        f"and {100 * train['shares']['convolutions']:.0f} % of its training step, batch norm "
        f"{100 * forward['shares']['batch norm']:.0f} % and {100 * train['shares']['batch norm']:.0f} %, AdamW "
        f"{100 * train['shares']['optimiser']:.0f} % of the step; outside torch ops ({outside}) "
        f"{100 * forward['shares']['outside ops']:.0f} % and {100 * train['shares']['outside ops']:.0f} %. The forward pass "
        f"runs at {min(rates['forward']):,.0f} to {max(rates['forward']):,.0f} GFLOP/s and the training step at "
        f"{min(rates['train']):,.0f} to {max(rates['train']):,.0f} across the settings: the convolution kernels, not the "
        "head or the framework, bound both.",
        f"- **Post-hoc maps**: Grad-CAM, Grad-CAM++ and LayerCAM take {min(gradient):.1f} to {max(gradient):.1f} times "
        f"SoftCAM's time and {min(held):.1f} to {max(held):.1f} times its memory: a forward pass that records autograd "
        "(keeping every activation for the backward pass), then gradients of the logit back to the feature map; "
        f"Score-CAM costs {min(scorecam):,.0f} to {max(scorecam):,.0f} times as much: one forward pass per feature channel "
        f"({channels}). SoftCAM's map is the forward pass's own output.",
    ]
    lines += ["", "Data path of a training step with cached preprocessing: the training config's random augmentations "
              "(flip, affine, contrast) through its DataLoader workers, next to the SoftCAM training step:", "",
              "| input | loader workers | augmentation (images/s) | SoftCAM training step (images/s) |",
              "| --- | --- | --- | --- |"]
    for a in report["augmentation"]:
        steps = ", ".join(f"{_rate(rate)} ({label.split(',')[0]})" for label, rate in a["train_images_per_s"].items())
        lines.append(f"| {a['input']} | {a['num_workers']} | {_rate(a['images_per_s'])} | {steps} |")
    slow = [a["input"] for a in report["augmentation"] if any(a["images_per_s"] < r for r in a["train_images_per_s"].values())]
    lines += ["", f"- **Data loading** would bound training at {', '.join(slow)} (augmentation slower than a step)." if slow else
              "- **Data loading** keeps up with every training step measured here: the step, not the data path, bounds training."]
    lines += [
        "",
        "Each output writer of configs/inference.json alone (its plug-in object, writing atomically with fsync), per",
        "image, single-threaded, after one warm-up call (same run):",
        "",
        "| output | ms per image |",
        "| --- | --- |",
        *[f"| {name} | {ms} |" for name, ms in report["pipeline"]["output_ms_per_image"].items()],
        "",
        "Writing runs in a thread pool beside the model, and decoding in DataLoader workers, so they overlap",
        "the forward pass; but on a CPU they share the same cores with it. Where the forward pass costs less",
        "than writing the outputs (a slim network), the writers bound the pipeline; the ratio improves as the",
        "model's share grows (full-width ResNet-18) and on a GPU, where the forward pass leaves the cores free.",
    ]
    return lines


def _given(value, default):
    return default if value is None else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=None, help="N or N^2 (2D), N^3 (3D); default 224 512 96^3")
    parser.add_argument("--backbones", nargs="+", default=None, help="default resnet18 resnet50")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default 1 on CPU; on CUDA 128 / 24 / 4 for 224^2 / 512^2 / 96^3")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds after the first (CPU 10, CUDA 20; the budget stops them sooner)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds per case after which no further call starts (CPU 5, CUDA 20)")
    parser.add_argument("--scorecam-budget", type=float, default=None, help="run Score-CAM when its estimate is below this "
                        "many seconds, else report the estimate (CPU 30, CUDA 120)")
    parser.add_argument("--images", type=int, default=None, help="DICOM images through the pipeline (default 64; --quick 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads per case (default: torch's, "
                        "one per core); 1 is steadier on a machine other work keeps busy")
    parser.add_argument("--quick", action="store_true", help="224^2 and ResNet-18 only, fewer pipeline images and repeats")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    sizes = args.sizes or ([(2, 224)] if args.quick else [(2, 224), (2, 512), (3, 96)])
    backbones = args.backbones or (["resnet18"] if args.quick else ["resnet18", "resnet50"])
    report = run_benchmark(
        make_settings(sizes, backbones, args.device, args.batch_size), device=args.device,
        repeats=_given(args.repeats, 20 if cuda else (1 if args.quick else 10)),
        budget_s=_given(args.budget, 20.0 if cuda else 5.0),
        scorecam_budget_s=_given(args.scorecam_budget, 120.0 if cuda else 30.0),
        pipeline_images=_given(args.images, 16 if args.quick else 64),
        augmentation_images=1024 if cuda else 32, threads=args.threads,
    )
    report["command"] = " ".join(["python scripts/benchmark.py", *sys.argv[1:]])
    write_report(args.out, report)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')} in {report['minutes']} min")


if __name__ == "__main__":
    main()
