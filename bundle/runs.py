"""One training run: its identity, its folders, and the state it resumes from.

Every training gets a stamp (time to the microsecond and a random suffix), so runs started together
never share a name or a folder: by default its checkpoints go to ``models_dir/<model_name>/<stamp>``
and its galleries to ``output_dir/<model_name>/<stamp>``. The checkpoint folder holds ``run.json``
(the MLflow run id and name) and, every epoch, the whole training state (:class:`TrainingState`),
so that ``--resume true`` continues the same training in the same MLflow run.
"""

from __future__ import annotations

import json
import logging
import random
import re
import secrets
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.transforms import Randomizable

from bundle.tracking import open_run, reopen_run

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"
# MONAI's CheckpointSaver names its every-N-epochs files so when it saves several objects
STATE_FILE = re.compile(r"checkpoint_epoch=(\d+)\.pt")
_HELD_LOCKS: dict[str, object] = {}  # ckpt_dir -> the FileLock this process holds while it trains there


def unique_stamp() -> str:
    """``YYYYmmdd-HHMMSS-ffffff-xxxx``: the start time to the microsecond and 16 random bits. Sorts by
    time; two processes starting in the same microsecond still differ (1 in 65536 alike)."""
    return datetime.now().strftime("%Y%m%d-%H%M%S-%f") + "-" + secrets.token_hex(2)


def last_run_dir(model_dir: str | Path, holding: str = "model.pt", option: str = "--ckpt_dir") -> str:
    """The newest run folder under ``model_dir`` (stamps sort by time) that holds ``holding``; the error
    for none names ``option``, the setting that gives one instead."""
    folders = sorted(p for p in Path(model_dir).glob("*/") if (p / holding).is_file()) if Path(model_dir).is_dir() else []
    if not folders:
        raise FileNotFoundError(f"no training run with {holding} in {model_dir}: train first, or give {option}")
    return str(folders[-1])


def training_states(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """The saved training states in ``ckpt_dir`` as (epoch, path), oldest first."""
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("checkpoint_epoch=*.pt") if (m := STATE_FILE.fullmatch(p.name))]
    return sorted(found)


def complete(path: Path) -> bool:
    """Whether a saved state was written to the end: ``torch.save`` writes a zip archive whose
    directory comes last, so a file cut by a kill has none."""
    return zipfile.is_zipfile(path)


def read_run_record(ckpt_dir: str | Path) -> dict:
    """``ckpt_dir/run.json``: ``{"run_id", "run_name", "experiment_name", "stamp"}``."""
    path = Path(ckpt_dir) / RUN_RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {ckpt_dir} is not the folder of a training started by this bundle")
    return json.loads(path.read_text())


def start_training_run(tracking_uri: str, experiment_name: str, run_name: str, ckpt_dir: str, params: dict,
                       resume: bool = False) -> str:
    """Claim ``ckpt_dir`` for this process and return the id of its MLflow run: a new run, recorded in
    ``ckpt_dir/run.json``, or with ``resume`` the recorded one, reopened.

    The claim is a lock on ``ckpt_dir/run.lock`` held until training ends (the system drops it when
    the process dies): a second training into the same folder, or a resume of a training that is
    still running, fails at once instead of overwriting its checkpoints.
    """
    from filelock import FileLock, Timeout

    folder = Path(ckpt_dir)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / "run.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RuntimeError(f"{folder} is in use by another training; give each training its own --ckpt_dir") from None
    _HELD_LOCKS[str(folder)] = lock
    if resume:
        record = read_run_record(folder)
        return reopen_run(tracking_uri, record["run_id"], params)
    run_id = open_run(tracking_uri, experiment_name, run_name)
    record = {"run_id": run_id, "run_name": run_name, "experiment_name": experiment_name}
    (folder / RUN_RECORD).write_text(json.dumps(record, indent=1))
    return run_id


def release_training_run(ckpt_dir: str | Path) -> None:
    """Give up the claim of :func:`start_training_run` on ``ckpt_dir`` (no-op when not held)."""
    lock = _HELD_LOCKS.pop(str(Path(ckpt_dir)), None)
    if lock is not None:
        lock.release()


class TrainingState:
    """Save the whole state of a training after every epoch and, with ``resume``, restore the last one
    when the trainer starts: MONAI's CheckpointSaver and CheckpointLoader over the trainer (epoch,
    iteration, best training metric), the network, optimizer, scheduler, AMP grad scaler, the random
    generators (:class:`RandomGenerators`), the evaluator's best validation metric and the best-model
    saver's record of its best score (so ``model.pt`` is only replaced by a better one after a resume).

    Files: ``ckpt_dir/checkpoint_epoch=N.pt``, the last ``keep`` epochs (a kill while one is written
    leaves the previous one). Attach after the validation and MLflow handlers, so the state is taken
    once the epoch is validated and logged. Under ``torch.distributed`` attach it on every process:
    process 0 writes the file, every process loads it.
    """

    def __init__(self, ckpt_dir: str, network: torch.nn.Module, optimizer, lr_scheduler=None, evaluator: Engine | None = None,
                 best_model_saver: CheckpointSaver | None = None, resume: bool = False, map_location=None, keep: int = 2):
        self.ckpt_dir = ckpt_dir
        self.objects = {"network": network, "optimizer": optimizer, "lr_scheduler": lr_scheduler}
        if evaluator is not None:
            self.objects["best_validation"] = _BestMetric(evaluator)
        if best_model_saver is not None:
            self.objects["best_model"] = _BestScores(best_model_saver)
        self.resume = resume
        self.map_location = map_location
        self.keep = keep

    def attach(self, engine: Engine) -> None:
        objects = {k: v for k, v in self.objects.items() if v is not None}
        objects["trainer"] = engine
        objects["random"] = RandomGenerators(engine.data_loader.dataset)
        if getattr(engine, "scaler", None) is not None:
            objects["grad_scaler"] = engine.scaler
        for key in ("best_metric", "best_metric_epoch"):  # MONAI's record of the best training metric
            if key not in engine.state_dict_user_keys:
                engine.state_dict_user_keys.append(key)
        saver = CheckpointSaver(save_dir=self.ckpt_dir, save_dict=objects, save_interval=1, n_saved=self.keep)
        if self.resume:
            epoch, path = self._last_state()
            CheckpointLoader(load_path=str(path), load_dict=objects, map_location=self.map_location).attach(engine)
            # the saver takes over the files already there, so it keeps `keep` of them in all (MONAI's
            # CheckpointSaver does not expose the ignite Checkpoint that saves every epoch)
            older = [(e, p.name) for e, p in training_states(self.ckpt_dir) if e <= epoch]
            saver._interval_checkpoint.load_state_dict({"_saved": older[-self.keep:]})
            logger.info("resuming %s from the end of epoch %d", self.ckpt_dir, epoch)
        saver.attach(engine)
        engine.add_event_handler(Events.COMPLETED, lambda _: release_training_run(self.ckpt_dir))

    def _last_state(self) -> tuple[int, Path]:
        states = training_states(self.ckpt_dir)
        while states and not complete(states[-1][1]):
            epoch, path = states.pop()
            logger.warning("%s was cut short (the training was stopped while writing it); using the one before", path.name)
            if not dist.is_initialized() or dist.get_rank() == 0:
                path.unlink()
        if not states:
            raise FileNotFoundError(f"no saved training state (checkpoint_epoch=N.pt) in {self.ckpt_dir}: the training "
                                    "stopped before its first epoch ended; start it again without --resume")
        return states[-1]


class RandomGenerators:
    """The random generators a training draws from, as one state dict: Python's, NumPy's and torch's
    global generators (CPU and CUDA), and the NumPy generator of every random transform of
    ``dataset`` (MONAI transforms draw from their own, ``Randomizable.R``, which with ``num_workers=0``
    carries over from epoch to epoch; with workers, each epoch's are seeded from torch's generator).

    Neither ignite nor MONAI checkpoints generators; without them a resumed training draws other
    augmentations and another shuffle than an uninterrupted one. Under ``torch.distributed`` every
    process has its own generators (seed + rank): ``state_dict`` gathers all of them (every process
    must call it, as ignite's Checkpoint does) and ``load_state_dict`` takes this process's.
    """

    def __init__(self, dataset):
        self.transform_generators = _transform_generators(getattr(dataset, "transform", None))

    def _local_state(self) -> dict:
        return {"python": random.getstate(), "numpy": _numpy_state(np.random.get_state()),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "transforms": [_numpy_state(g.get_state()) for g in self.transform_generators]}

    def state_dict(self) -> dict:
        if not (dist.is_available() and dist.is_initialized()):
            return {"processes": [self._local_state()]}
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, self._local_state())
        return {"processes": states}

    def load_state_dict(self, state: dict) -> None:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        if len(state["processes"]) != world:
            raise ValueError(f"the training state was saved by {len(state['processes'])} processes, not {world}")
        own = state["processes"][rank]
        random.setstate((own["python"][0], tuple(own["python"][1]), own["python"][2]))
        np.random.set_state(_numpy_state_back(own["numpy"]))
        torch.set_rng_state(own["torch"].cpu())
        if own["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in own["cuda"]])
        if len(own["transforms"]) != len(self.transform_generators):
            raise ValueError("the training state holds other random transforms than this training's")
        for generator, saved in zip(self.transform_generators, own["transforms"]):
            generator.set_state(_numpy_state_back(saved))


def _transform_generators(transform) -> list[np.random.RandomState]:
    """The ``R`` of every Randomizable reachable from ``transform`` (a Compose and what it holds, as
    MONAI's ``set_rnd`` walks it), in a fixed order."""
    found, seen = [], set()

    def walk(obj):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)
            return
        if not hasattr(obj, "__dict__") or not type(obj).__module__.startswith(("monai", "transforms")):
            return
        generator = getattr(obj, "R", None) if isinstance(obj, Randomizable) else None
        if isinstance(generator, np.random.RandomState) and id(generator) not in seen:
            seen.add(id(generator))
            found.append(generator)
        for value in vars(obj).values():
            walk(value)

    walk(transform)
    return found


def _numpy_state(state: tuple) -> tuple:
    """NumPy's legacy generator state with its key array as a tensor (``torch.load(weights_only=True)``
    refuses NumPy arrays)."""
    name, key, pos, has_gauss, gauss = state
    return name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


def _numpy_state_back(state) -> tuple:
    name, key, pos, has_gauss, gauss = state
    return name, key.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss


class _BestMetric:
    """An engine's best key metric so far and its epoch (MONAI keeps them in ``engine.state``), as a state dict."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def state_dict(self) -> dict:
        return {"best_metric": float(self.engine.state.best_metric), "best_metric_epoch": int(self.engine.state.best_metric_epoch)}

    def load_state_dict(self, state: dict) -> None:
        self.engine.state.best_metric = state["best_metric"]
        self.engine.state.best_metric_epoch = state["best_metric_epoch"]


class _BestScores:
    """The scores a MONAI CheckpointSaver has kept its best checkpoints for, as a state dict of plain
    floats (``torch.load(weights_only=True)`` refuses the NumPy scalars the scores are). The saver
    keeps them in an ignite Checkpoint it does not expose; its own ``load_state_dict`` restores them."""

    def __init__(self, saver: CheckpointSaver):
        self.saver = saver

    def state_dict(self) -> dict:
        return {"_saved": [(float(score), name) for score, name in self.saver._key_metric_checkpoint.state_dict()["_saved"]]}

    def load_state_dict(self, state: dict) -> None:
        self.saver.load_state_dict(state)
