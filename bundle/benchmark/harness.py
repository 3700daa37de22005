"""How cases are timed: side by side in one fresh process, their calls interleaved, the fastest call kept;
peak memory from CUDA's allocator or, on CPU, from the resident set of one more fresh process per case."""

from __future__ import annotations

import ctypes
import multiprocessing
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

from bundle.benchmark.cases import Case, Setting, build_case


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set of this process (or its largest finished child), MiB; ru_maxrss is KiB on Linux."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(who).ru_maxrss * scale / 2**20


def _timed_call(case: Case, device: torch.device) -> tuple[float, float | None]:
    """Seconds of one call and, on CUDA, the memory it allocated at its peak over what was in place (MiB)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    synchronize(device)
    tick = time.perf_counter()
    case.call(case.images)
    synchronize(device)
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
        seconds, count = min(t for t, _ in timed), len(case.images)
        memory = [m for _, m in timed if m is not None]
        results[name] = {"seconds": seconds, "images": count, "images_per_s": count / seconds,
                         "seconds_per_image": seconds / count, "calls": len(calls[name]),
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
    before = rss_mib()
    case.call(case.images)
    return {"memory_mib": round(max(rss_mib() - before, 0.0), 1), "allocator": allocator}


PRELOAD = ["torch", "monai.bundle", "torchcam.methods", "captum.attr", "highdicom", "bundle.inference",
           "bundle.explain.methods", "bundle.benchmark.cases", "bundle.benchmark.harness", "bundle.benchmark.pipeline",
           "bundle.benchmark.profiling"]


class FreshProcesses:
    """Runs each call in a new process: forkserver with torch, MONAI and the bundle preloaded where the
    platform has one, so a case costs a fork rather than the imports; spawn elsewhere.

    Inside, processes start as they would in this one (fork on Linux): the inference pipeline's DataLoader
    workers must share its transform objects, whose identities MONAI checks when inverting them.
    ``threads``: torch's intra-op threads in each process (None: torch's default, one per core).
    """

    def __init__(self, threads: int | None = None):
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        self.context = multiprocessing.get_context(method)
        if method == "forkserver":
            self.context.set_forkserver_preload(PRELOAD)
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
