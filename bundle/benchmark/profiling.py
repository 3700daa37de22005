"""Where a case's time goes (torch.profiler: shares by kind of op and the top ops) and how fast the
training data path delivers images (the training config's random augmentations through its DataLoader)."""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from bundle.benchmark.cases import Setting, build_case, images, train_config
from bundle.benchmark.harness import synchronize

CATEGORIES = {  # by op (CPU) or kernel (CUDA) name, the first that matches; CPU ops inside the optimiser's step are "optimiser"
    "convolutions": ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "winograd", "xmma"),
    "batch norm": ("batch_norm", "batchnorm", "bn_"),
    "optimiser": ("optimizer.", "adam", "multi_tensor", "foreach"),
    "activations and adds": ("relu", "clamp", "threshold", "add"),
    "pooling": ("pool",),
}
COLUMNS = [*CATEGORIES, "other ops", "outside ops"]


def category(name: str, ancestors: list[str] = ()) -> str:
    if any(a.startswith("Optimizer.") for a in ancestors):
        return "optimiser"
    return next((c for c, words in CATEGORIES.items() if any(w in name.lower() for w in words)), "other ops")


def _ancestors(event) -> list[str]:
    names = []
    while event.cpu_parent is not None:
        event = event.cpu_parent
        names.append(event.name)
    return names


def profile_case(setting: Setting, kind: str, name: str, calls: int = 1, top: int = 8) -> dict:
    """Share of one case's wall time in each kind of op (CPU: op self time, CUDA: kernel time) and outside
    them (Python, dispatch and, on CUDA, the GPU waiting for the host), and its ``top`` ops by that time,
    over ``calls`` calls after one warm-up."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(setting.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    case = build_case(setting, kind, name)
    case.warm_up()
    case.call(case.images)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        tick = time.perf_counter()
        for _ in range(calls):
            case.call(case.images)
        synchronize(device)
        wall_us = (time.perf_counter() - tick) * 1e6
    if device.type == "cuda":
        rows = [(e.key, e.self_device_time_total, category(e.key)) for e in prof.key_averages()
                if e.device_type == DeviceType.CUDA]
    else:
        rows = [(e.name, e.self_cpu_time_total, category(e.name, _ancestors(e))) for e in prof.events()]
    shares = dict.fromkeys(COLUMNS[:-1], 0.0)
    totals: dict[str, float] = {}
    for key, us, kind_of_op in rows:
        shares[kind_of_op] += us / wall_us
        totals[key] = totals.get(key, 0.0) + us
    shares["outside ops"] = max(0.0, 1.0 - sum(shares.values()))
    ranked = sorted(totals.items(), key=lambda r: -r[1])[:top]
    return {"case": f"{kind} {name}", "setting": setting.label, "timed": "GPU kernels" if device.type == "cuda" else "CPU ops",
            "wall_s": wall_us / 1e6 / calls, "images": len(case.images), "shares": shares,
            "top": [{"op": key, "share": us / wall_us} for key, us in ranked]}


def augmentation_rate(setting: Setting, count: int = 32) -> dict:
    """Images per second of the training config's random augmentations (``train#random_transforms``) over
    images already cached in memory, through a DataLoader with the config's workers: the data path that
    feeds a training step when the deterministic preprocessing is cached."""
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose

    parser = train_config(image_size=setting.size, spatial_dims=setting.spatial_dims, device=torch.device(setting.device))
    workers = parser.get_parsed_content("num_workers")
    cached = [{"image": x} for x in images(Setting(**{**asdict(setting), "device": "cpu", "memory_format": None}), count)]
    batch_size = max(1, min(setting.batch_size, count // max(1, 2 * workers)))  # every worker gets batches
    loader = DataLoader(Dataset(cached, Compose(parser.get_parsed_content("train#random_transforms"))),
                        batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:  # warm-up pass: starts the workers
        pass
    tick = time.perf_counter()
    delivered = sum(len(batch["image"]) for batch in loader)
    seconds = time.perf_counter() - tick
    return {"input": f"{setting.size}^{setting.spatial_dims}", "images": delivered, "num_workers": workers,
            "images_per_s": delivered / seconds}
