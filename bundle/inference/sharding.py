"""Inference under torchrun (configs/multi_gpu_inference.json): each process a shard of the inputs,
process 0 the one set of tables and the one MLflow run. See docs/scaling.md."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from bundle.distributed import leave_process_group
from bundle.files import atomic_write
from bundle.inference.loop import process
from bundle.inference.tables import InferenceResult, InputsFailed
from bundle.inputs import InputFailure

logger = logging.getLogger("bundle.inference")
SHARDS_DIR = ".shards"  # under output_dir: each process's results until process 0 merges them


def process_group() -> tuple[int, int]:
    """(rank, world size) of this process in torch.distributed's default group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast(value):
    """``value`` as process 0 holds it, on every process (the others pass None)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_shard(runner, rank: int, world_size: int) -> tuple[list[InferenceResult], list[InputFailure]]:
    """One process's part of a multi-process run of ``runner`` (an ``EvidenceInference``).

    Process 0 plans (removes partial files, discovers the inputs, finds those an earlier run completed)
    and sends the plan to all, so every process shards the same list even if files arrive meanwhile;
    process r takes every ``world_size``-th remaining input from the r-th (a 3D series is one input,
    so it stays whole) and writes its outputs and ``output_dir/.shards/rank<r>.json``. After all have
    written, process 0 merges the shards into the one set of tables, in input order as a single
    process writes them, logs the one MLflow run and removes the shards. Every process then raises
    ``InputsFailed`` if any input failed anywhere, so that torchrun reports it.
    Returns this process's own results and failures (process 0: the merged ones).
    """
    inputs, unusable, resumed = broadcast(runner.plan() if rank == 0 else None)
    mine = [i for i in range(len(inputs)) if i not in resumed][rank::world_size]
    logger.info("process %d of %d: %d of %d inputs (%d done by an earlier run, %d unusable files in the input folder)",
                rank, world_size, len(mine), len(inputs), len(resumed), len(unusable))
    processed, failed = process(runner, inputs, mine)
    shard_path = runner.output_dir / SHARDS_DIR / f"rank{rank}.json"
    with atomic_write(shard_path) as tmp:  # a process that dies leaves no half-written shard
        tmp.write_text(json.dumps({
            "results": [{"index": i, "probabilities": r.probabilities, "predicted_class": r.predicted_class,
                         "outputs": r.outputs, "notes": r.notes} for i, r in processed],
            "failures": [{"index": i, "path": str(f.path), "reason": f.reason} for i, f in failed],
        }))
    # every shard is written; on CUDA the barrier's tensor goes on this process's GPU, not GPU 0
    dist.barrier(device_ids=[torch.cuda.current_device()] if runner.device.type == "cuda" else None)
    failure = None
    if rank == 0:
        results, failures = _merge_shards(runner.output_dir, inputs, unusable, resumed, world_size)
        try:
            runner.finish(results, failures)
        except InputsFailed as error:  # raised below, once every process knows the totals
            failure = error
    else:
        results, failures = [r for _, r in processed], [f for _, f in failed]
    # process 0 sends the totals only when all is written: a process that ended earlier with status 2
    # would make torchrun stop process 0 before its tables were written
    failed_total, total = broadcast((len(failures), len(results) + len(failures)) if rank == 0 else None)
    if failed_total:
        # the config's finalize (which leaves the process group) does not run after an exception, and gloo's
        # threads must not outlive the interpreter (a process ending with status 2 would abort instead)
        leave_process_group(runner.device)
        raise failure or InputsFailed(failed_total, total, runner.output_dir / "failures.csv")
    return results, failures


def _merge_shards(output_dir: Path, inputs, discovery_failures: list[InputFailure], resumed: dict[int, InferenceResult],
                  world_size: int) -> tuple[list[InferenceResult], list[InputFailure]]:
    """Read ``.shards/rank<r>.json`` of every process, delete them, and return all results (with the
    resumed ones) and failures in input order (the folder's unusable files first), as one process lists them."""
    results: list[tuple[int, InferenceResult]] = list(resumed.items())
    failures: list[tuple[int, InputFailure]] = []
    shards = [output_dir / SHARDS_DIR / f"rank{r}.json" for r in range(world_size)]
    for path in shards:
        shard = json.loads(path.read_text())
        results += [(r["index"], InferenceResult(inputs[r["index"]], r["probabilities"], r["predicted_class"],
                                                 r["outputs"], r["notes"])) for r in shard["results"]]
        failures += [(f["index"], InputFailure(Path(f["path"]), f["reason"])) for f in shard["failures"]]
    for path in shards:
        path.unlink()
    with contextlib.suppress(OSError):  # other files in it are not ours to delete
        shards[0].parent.rmdir()
    results.sort(key=lambda pair: pair[0])
    failures.sort(key=lambda pair: pair[0])
    return [r for _, r in results], discovery_failures + [f for _, f in failures]
