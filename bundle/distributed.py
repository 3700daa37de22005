"""Multi-process training support used by ``configs/multi_gpu_train.json``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch.distributed as dist
from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)


class ShardRecord:
    """Record, for this process, which training items it draws in every epoch.

    At the start of each epoch (after MONAI has set the DistributedSampler's epoch) the trainer's
    batch sampler is read and ``record_dir/rank{r}.json`` is rewritten as
    ``{"rank": r, "world_size": n, "epochs": {"1": [[i, ...], ...], ...}}``: the batches of indices
    into the datalist's ``training`` list, in order, after ``drop_last``. It shows that the ranks split
    the data without overlap and which images a rank trained on. Indices only: file names may carry UIDs.
    """

    def __init__(self, record_dir: str | Path):
        self.record_dir = Path(record_dir)
        self.rank, self.world_size = 0, 1
        self.epochs: dict[str, list[list[int]]] = {}

    def attach(self, engine: Engine) -> None:
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        engine.add_event_handler(Events.EPOCH_STARTED, self._record)

    def _record(self, engine: Engine) -> None:
        batch_sampler = getattr(engine.data_loader, "batch_sampler", None)
        if batch_sampler is None:  # an iterable dataset: no indices to record
            return
        batches = [[int(i) for i in batch] for batch in batch_sampler]
        self.epochs[str(engine.state.epoch)] = batches
        self.record_dir.mkdir(parents=True, exist_ok=True)
        path = self.record_dir / f"rank{self.rank}.json"
        path.write_text(json.dumps({"rank": self.rank, "world_size": self.world_size, "epochs": self.epochs}))
        logger.info("rank %d of %d: epoch %d draws %d training items", self.rank, self.world_size,
                    engine.state.epoch, sum(len(b) for b in batches))


def leave_process_group(device) -> None:
    """End this process's part in the default process group, if there is one: wait until every process
    has got here, then destroy the group. No process tears its connections down while another is still
    writing checkpoints, tables or MLflow records, and every backend is shut down before the interpreter
    exits (gloo's worker threads must not outlive it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier(device_ids=[device.index] if device.type == "cuda" and device.index is not None else None)
    dist.destroy_process_group()


def from_rank0(value):
    """``value`` as process 0 has it, in every process of the default process group (``value`` itself
    when there is none): e.g. one run stamp, drawn by process 0, names the folders of all processes."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]
