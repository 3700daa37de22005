"""Checkpoints as the training config saves them: what they hold, loading them, and telling them apart.

``model.pt`` (the best checkpoint, written by MONAI's CheckpointSaver) holds
``{"model": state dict, "description": {...}}``: the weights and what is needed to use them alone,

- ``network``: the keyword arguments of ``bundle.networks.classifier`` the network was built with
  (backbone, backbone_kwargs, head, spatial_dims, in_channels, num_classes and any option added
  later, such as an output stride), without ``backbone_weights`` (the weights it started from);
- ``sigmoid_branch``: whether it is a ``SigmoidBranchClassifier`` (a frozen classifier plus a branch);
- ``preprocessing``: what inference must repeat, ``image_size`` and the intensity ``window``
  ((center, width), or None: the image's own DICOM window, else its percentiles);
- ``class_names`` ({"0": name, ...}), ``model_name``, ``bundle_version`` and ``datalist_digest``
  (``bundle.data.datalist_digest``: which datalist it was trained on, without a path).

Checkpoints saved before descriptions existed are a bare state dict (or one under "model"); they still
load, with the settings given on the command line or the training config's defaults.

The configs read a setting with :func:`trained_setting` (so ``--ckpt_path`` alone is enough) and build
the network with :func:`network_for_checkpoint`, which refuses a given value that contradicts the
checkpoint, naming both.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from pathlib import Path

import torch
from torch import nn

DESCRIPTION_FORMAT = 1
# settings outside ``network`` that a config may read or give, and where the description keeps them
PREPROCESSING = ("image_size", "window")
TOP_LEVEL = ("class_names", "model_name", "sigmoid_branch", "bundle_version", "datalist_digest")


def weights_digest(path: Path) -> str:
    """First 12 hex digits of the checkpoint's SHA-256: outputs of other weights get other UIDs."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def load_checkpoint(network: nn.Module, path: str | Path) -> None:
    """Load a checkpoint saved by the training config (a bare state dict, or one under "model")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train first, or pass --ckpt_path)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    network.load_state_dict(state)


def _plain(value):
    """``value`` as JSON has it (tuples as lists, keys as strings): how settings are compared and saved."""
    return json.loads(json.dumps(value))


class ModelDescription:
    """The ``description`` entry of ``model.pt``: an object with ``state_dict`` / ``load_state_dict``, as
    MONAI's CheckpointSaver (ignite's Checkpoint) needs of everything it saves.

    ``network``: the classifier being trained (``build_options`` of ``bundle.networks.classifier``; a
    DistributedDataParallel wrapper is looked through). ``class_names``: index -> name (the metadata's
    channel_def; classes it does not name are called "class k"). ``datalist`` and ``dataset_dir``: the
    training datalist as ``bundle.data.load_datalist`` returns it, for its digest.
    """

    def __init__(self, network: nn.Module, model_name: str, image_size: int, window=None, class_names: dict | None = None,
                 bundle_version: str = "", datalist: dict | None = None, dataset_dir: str | Path | None = None):
        from bundle.data import datalist_digest
        from bundle.networks.sigmoid_branch import SigmoidBranchClassifier

        network = getattr(network, "module", network)
        options = getattr(network, "build_options", None)
        if not options:
            raise TypeError(f"a {type(network).__name__} does not say how it was built: build it with "
                            "bundle.networks.classifier (or sigmoid_branch_classifier)")
        self.network = _plain({k: v for k, v in options.items() if k != "backbone_weights"})
        names = {str(k): str(v) for k, v in (class_names or {}).items()}
        self.state = {
            "format": DESCRIPTION_FORMAT,
            "network": self.network,
            "sigmoid_branch": isinstance(network, SigmoidBranchClassifier),
            "preprocessing": _plain({"image_size": image_size, "window": window}),
            "class_names": {str(k): names.get(str(k), f"class {k}") for k in range(int(self.network["num_classes"]))},
            "model_name": model_name,
            "bundle_version": str(bundle_version),
            "datalist_digest": datalist_digest(datalist, dataset_dir) if datalist is not None else "",
        }

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


@functools.lru_cache(maxsize=32)
def _read(path: str, modified: int, size: int) -> dict | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises EOFError, RuntimeError, UnpicklingError, ... for what is no checkpoint
        raise ValueError(f"cannot read the checkpoint {path}: {type(err).__name__}: {str(err)[:200]}") from None
    if isinstance(state, dict) and isinstance(state.get("description"), dict) and "model" in state:
        return state["description"]
    return None


def read_description(path: str | Path) -> dict | None:
    """The description saved in the checkpoint ``path``, or None for a checkpoint without one.
    Raises FileNotFoundError naming the file when it is missing."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train first, or pass --ckpt_path)")
    stat = path.stat()
    return _read(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def settings(description: dict) -> dict:
    """A description's settings in one flat dict: the network's keyword arguments, the preprocessing
    and the top-level entries (``class_names``, ``model_name``, ...)."""
    return {**description["network"], **description["preprocessing"],
            **{k: description[k] for k in TOP_LEVEL if k in description}}


def _factory_default(key: str):
    """What ``classifier`` uses for an option a description does not record (one added after it was saved)."""
    from bundle.networks.classifier import classifier

    parameter = inspect.signature(classifier).parameters.get(key)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def trained_setting(path: str | Path | list, key: str, fallback=None):
    """The value the checkpoint ``path`` was trained with for ``key`` (a network option, ``image_size``,
    ``window``, ``class_names``, ``model_name``), or ``fallback`` for a checkpoint without a description.

    ``path`` may be a list of checkpoints (the models of a comparison): the missing ones are passed
    over, the described ones must agree (ValueError naming each one's value otherwise), and
    ``fallback`` is returned when none is described.
    """
    paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
    found = {}
    for p in paths:
        if len(paths) > 1 and not p.expanduser().is_file():
            continue
        description = read_description(p)
        if description is not None:
            values = settings(description)
            found[p] = values[key] if key in values else _factory_default(key)
    distinct = {json.dumps(v, sort_keys=True) for v in found.values()}
    if len(distinct) > 1:
        listing = "; ".join(f"{p}: {v!r}" for p, v in found.items())
        raise ValueError(f"the checkpoints were trained with different {key} ({listing}): compare models trained alike")
    return next(iter(found.values())) if found else fallback


def _same(given, trained) -> bool:
    if given in (None, {}) and trained in (None, {}):  # backbone_kwargs None and {} build the same network
        return True
    return _plain(given) == _plain(trained)


def network_for_checkpoint(path: str | Path, branch: bool | None = None, **given) -> nn.Module:
    """The network (initial weights) whose state dict the checkpoint ``path`` holds, for the caller to load.

    Built as the checkpoint's description says; each ``given`` setting (a ``classifier`` option, or
    ``image_size`` / ``window``) that is not None must equal the checkpoint's, else ValueError naming
    both values and the file. ``branch``: expect a sigmoid-branch model (None: whatever it is).
    A checkpoint without a description gets ``classifier(**given network options)``, wrapped in a
    ``SigmoidBranchClassifier`` when ``branch``.
    """
    from bundle.networks.classifier import classifier
    from bundle.networks.sigmoid_branch import SigmoidBranchClassifier

    description = read_description(path)
    if description is None:
        accepted = inspect.signature(classifier).parameters
        network = classifier(**{k: v for k, v in given.items() if k in accepted and v is not None})
        return SigmoidBranchClassifier.from_classifier(network) if branch else network
    trained = settings(description)
    for key, value in {**given, "sigmoid_branch": branch}.items():
        if value is None:
            continue
        held = trained[key] if key in trained else _factory_default(key)
        if not _same(value, held):
            raise ValueError(f"{key} {value!r} contradicts the checkpoint {path}, which was trained with {key} {held!r} "
                             "(the checkpoint describes itself: leave the setting out)")
    network = classifier(**description["network"])
    return SigmoidBranchClassifier.from_classifier(network) if description["sigmoid_branch"] else network
