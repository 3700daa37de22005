"""Writing each input's outputs in worker processes, concurrently with the next batches' forward pass.

Writers are Python-heavy (highdicom builds and validates each DICOM object element by element), so
threads of this process would take turns on its interpreter lock, and the forward pass, which needs
that lock between its operations, waits behind them. Worker processes write on cores of their own.

The workers are forked: a started (spawned) one would import MONAI and torch again, seconds per
worker, before its first file. The first input of a pool is written in this process, before the
fork, so the workers inherit what writers load on their first call (highdicom's tables of the
standard take half a second) rather than each loading it again; each worker freezes what it
inherited out of the garbage collector's reach (``gc.freeze``), so collections do not copy the
parent's pages. Workers get each input as an ``EvidenceCase`` (numpy arrays and pydicom headers,
maps already on the input's grid) through a pipe, never touch torch, CUDA or the model, and inherit
the writers and this process's privacy filters (``bundle.privacy``). What a writer returns goes
back through the pipe.

A worker that dies (killed, out of memory) fails the inputs it and its pool had in flight, with a
reason naming the cause; their partial files are never renamed into place and they have no
completion record, so a rerun writes them again. A fresh pool takes the rest of the run. (The pool's
first input is written in this process: a writer that kills its process there ends the run.)
``processes=0`` writes in one thread of this process instead (no fork).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from bundle.inference.completion import CompletionRecords
from bundle.writers.base import EvidenceCase, EvidenceWriter

# Writer processes run at a lower priority than the model's thread: where the cores are all busy, the forward
# pass, which feeds every later stage, keeps its core, and the writers take the time it leaves. The number of
# inputs in flight is bounded, so writers that fall behind hold the loop back rather than pile up work.
WRITER_NICENESS = 10
_job: tuple | None = None  # a worker's (writers, output_dir, completion), set once when it starts


def write_case(case: EvidenceCase, writers: list[EvidenceWriter], output_dir: Path,
               completion: CompletionRecords | None) -> tuple[dict[str, list[str]], list[str]]:
    """Run every writer over one input (in config order), then record the input as complete.

    Returns its outputs ({kind: paths relative to ``output_dir``}) and why writers skipped it."""
    skipped = []
    for writer in writers:
        reason = writer.skip_reason(case)
        if reason:
            skipped.append(reason)
            continue
        case.written.setdefault(writer.kind, []).extend(writer.write(case, output_dir))
    outputs = {kind: [w.path for w in written] for kind, written in case.written.items()}
    if completion is not None:
        completion.record(case.input, case.probabilities, case.predicted_class, outputs, case.notes)
    return outputs, skipped


def _start_worker(writers, output_dir, completion) -> None:
    global _job
    gc.freeze()
    os.nice(WRITER_NICENESS)
    _job = (writers, output_dir, completion)


def _write_in_worker(case: EvidenceCase) -> tuple[dict[str, list[str]], list[str]]:
    return write_case(case, *_job)


class WriterPool:
    """``processes`` forked writer processes (0: one thread of this process) for one run's writers."""

    def __init__(self, writers: list[EvidenceWriter], output_dir: Path, completion: CompletionRecords | None,
                 processes: int):
        self.job = (list(writers), Path(output_dir), completion)
        self.processes = processes
        self.executor: Executor | None = None
        self.warmed = processes < 1

    def _write_here(self, case: EvidenceCase) -> Future:
        done = Future()
        try:
            done.set_result(write_case(case, *self.job))
        except Exception as err:  # the input's failure, reported through its future like the workers'
            done.set_exception(err)
        return done

    def _executor(self) -> Executor:
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1) if self.processes < 1 else ProcessPoolExecutor(
                max_workers=self.processes, mp_context=multiprocessing.get_context("fork"),
                initializer=_start_worker, initargs=self.job)
        return self.executor

    def submit(self, case: EvidenceCase) -> Future:
        """Write ``case``'s outputs; the future's result is ``write_case``'s."""
        if self.processes < 1:
            return self._executor().submit(write_case, case, *self.job)
        if not self.warmed:
            self.warmed = True
            return self._write_here(case)
        try:
            return self._executor().submit(_write_in_worker, case)
        except BrokenProcessPool:  # a worker died: its inputs in flight fail with that reason, the rest go on
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None
            return self._executor().submit(_write_in_worker, case)

    def __enter__(self) -> WriterPool:
        return self

    def __exit__(self, *exc) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=exc[0] is not None)
