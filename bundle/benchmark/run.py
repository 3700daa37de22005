"""One benchmark run: every setting's cases side by side, the profiles, the training data path and the
inference pipeline, returned as one plain dict (the JSON report that ``report`` renders)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import monai
import torch

from bundle.benchmark.cases import HEADS, POST_HOC, Setting, config_defaults, model_flops
from bundle.benchmark.harness import FreshProcesses, measure_memory, time_cases
from bundle.benchmark.pipeline import measure_pipelines
from bundle.benchmark.profiling import augmentation_rate, profile_case

# Targets, each printed only next to the measured figure it is compared with:
TARGETS = {"forward": 1.05, "train": 1.05, "pipeline": 0.5, "pipeline full width": 0.7}  # time ratios at most / rate ratios at least
GPU_TARGETS = {"train": 3000, "forward": 10000}  # images/s, ResNet-50 224^2 bf16 with the torchvision-equivalent stem, one H100/H200
TORCHVISION_STEM = {"conv1_t_stride": 2}  # MONAI's ResNet with torchvision's stem: feature maps 1/32 of the input
CUDA_BATCH = {(2, 224): 128, (2, 512): 24, (3, 96): 4}  # fits a ResNet-50 training step (stride-1 stem) in 80 GB with bf16


def scorecam_estimate(feature_channels: int, forward_seconds_per_image: float) -> float:
    """Seconds per image Score-CAM needs by its definition: one forward pass of the image and one of the
    image masked by each of the D feature maps (mask upsampling left out), at the black box's measured rate."""
    return (feature_channels + 1) * forward_seconds_per_image


def measure_setting(setting: Setting, run: Callable, repeats: int = 3, budget_s: float = 5.0,
                    scorecam_budget_s: float = 30.0, scorecam_images: int = 1, log: Callable = print) -> dict:
    """Every case of one setting with the ratios to their references: the black-box and SoftCAM forward
    passes timed side by side in one process, the maps in another, the training steps in a third; on CPU
    each case's memory in a process of its own. Score-CAM runs for real when its estimate
    (``scorecam_estimate``) fits ``scorecam_budget_s``; otherwise the estimate is reported, marked as such."""
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
        "gpu_target": setting.gpu_target, "load_average": [round(v, 2) for v in os.getloadavg()],
        "gflop_per_image": {kind: flops[kind] / 1e9 for kind in ("forward", "train", "head")},
        "feature_map": flops["feature_map"],
        "forward": {**forward, "ratio": forward["softcam"]["seconds"] / forward["linear"]["seconds"],
                    "memory_ratio": _ratio(forward["softcam"]["memory_mib"], forward["linear"]["memory_mib"])},
        "maps": {**maps, "times_cheaper": {m: maps[m]["seconds_per_image"] / softcam_map for m in POST_HOC}},
        "train": {**train, "ratio": train["softcam"]["seconds"] / train["linear"]["seconds"],
                  "memory_ratio": _ratio(train["softcam"]["memory_mib"], train["linear"]["memory_mib"])},
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def make_settings(sizes: list[tuple[int, int]], backbones: list[str], device: str, batch_size: int | None = None,
                  backbone_kwargs: list[dict] | None = None) -> list[Setting]:
    """One setting per backbone, backbone options and size, with the training config's precision and memory
    format for ``device``."""
    settings = []
    for backbone in backbones:
        for kwargs in backbone_kwargs or [{}]:
            for dims, size in sizes:
                defaults = config_defaults(device, dims)
                batch = batch_size or (CUDA_BATCH.get((dims, size), 8) if device.startswith("cuda") else 1)
                target = (backbone, dims, size) == ("resnet50", 2, 224) and kwargs in ({}, TORCHVISION_STEM)
                settings.append(Setting(backbone, dims, size, batch, device, defaults["amp_dtype"],
                                        defaults["memory_format"], dict(kwargs), target))
    return settings


def gpu_target_settings(device: str, size: int = 224, batch_size: int | None = None) -> list[Setting]:
    """The GPU targets' settings: ResNet-50 with the bundle's default stem and with the torchvision-equivalent
    one, at ``size``^2 (224 for the targets; smaller for a dry run of the same cases on a CPU)."""
    default, torchvision = make_settings([(2, size)], ["resnet50"], device, batch_size, [{}, TORCHVISION_STEM])
    default.gpu_target = torchvision.gpu_target = True
    if batch_size is None and device.startswith("cuda"):
        torchvision.batch_size = 2 * default.batch_size  # a quarter of the activations: a larger batch fits
    return [default, torchvision]


def run_benchmark(settings: list[Setting], device: str = "cpu", repeats: int = 3, budget_s: float = 5.0,
                  scorecam_budget_s: float = 30.0, scorecam_images: int = 1, pipeline_images: int = 64,
                  pipeline_models: dict | None = None, pipeline_image_rows: int | None = None,
                  augmentation_images: int = 32, profiled: list[Setting] | None = None, threads: int | None = None,
                  log: Callable = print) -> dict:
    """Measure everything and return the report (what ``report.write_report`` renders and stores as JSON).
    ``pipeline_models``: label -> config overrides of configs/inference.json (``pipeline.pipeline_models``);
    ``profiled``: the settings whose SoftCAM forward and training step are profiled (default: the first GPU
    target's setting measured, else the first setting)."""
    load_before = os.getloadavg()
    started = time.perf_counter()
    with FreshProcesses(threads) as run:
        results = []
        for setting in settings:
            try:
                results.append(measure_setting(setting, run, repeats, budget_s, scorecam_budget_s, scorecam_images, log))
            except Exception as err:  # one setting out of memory, say: report it and measure the others
                log(f"{setting.label}: not measured: {type(err).__name__}: {err}", flush=True)
                results.append({"setting": asdict(setting), "label": setting.label, "error": f"{type(err).__name__}: {err}"})
        measured = [Setting(**r["setting"]) for r in results if "error" not in r]
        if not measured:
            raise RuntimeError("no setting could be measured: " + "; ".join(r["error"] for r in results))
        profiled = profiled or [s for s in measured if s.gpu_target][:1] or measured[:1]
        profiles = [run(profile_case, s, kind, "softcam") for s in profiled for kind in ("forward", "train")]
        loading = [run(augmentation_rate, s, augmentation_images if s.spatial_dims == 2 else max(2, augmentation_images // 8))
                   for s in _one_per_size(measured)]
        pipelines = measure_pipelines(run, pipeline_images, device, pipeline_models or {}, image_rows=pipeline_image_rows,
                                      log=log) if pipeline_models else []
    for entry in loading:
        trained = [r for r in results if "error" not in r
                   and f"{r['setting']['size']}^{r['setting']['spatial_dims']}" == entry["input"]]
        entry["train_images_per_s"] = {r["label"]: r["train"]["softcam"]["images_per_s"] for r in trained}
    return {
        "date": time.strftime("%Y-%m-%d"), "device": device_name(device, threads), "machine": platform.machine(),
        "cores": os.cpu_count(), "on_gpu": device.startswith("cuda"),
        "load_average": {"start": [round(v, 2) for v in load_before], "end": [round(v, 2) for v in os.getloadavg()]},
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
        "torchcam": version("torchcam"),
        "method": {"repeats": repeats, "budget_s": budget_s, "scorecam_budget_s": scorecam_budget_s,
                   "scorecam_images": scorecam_images},
        "targets": TARGETS, "gpu_targets": GPU_TARGETS,
        "settings": results, "profiles": profiles, "augmentation": loading,
        "pipeline": {"images": pipeline_images, "results": pipelines},
    }


def _one_per_size(settings: list[Setting]) -> list[Setting]:
    first: dict[tuple[int, int], Setting] = {}
    for setting in settings:
        first.setdefault((setting.spatial_dims, setting.size), setting)
    return list(first.values())


def device_name(device: str, threads: int | None) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), platform.processor())
    return f"CPU ({model or 'unknown'}), {os.cpu_count()} cores, torch {threads or torch.get_num_threads()} threads"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
