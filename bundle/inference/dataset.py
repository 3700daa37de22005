"""Loading one input for the model and its writers: decoded once, in a DataLoader worker."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from bundle.inputs import InferenceInput
from bundle.privacy import redact
from bundle.visualize import display_rgb
from bundle.writers.conformance import conformant
from transforms.dicom import dicom_frame, image_description, read_dicom

PER_FRAME_GROUPS = 0x52009230  # (5200,9230) Per-frame Functional Groups Sequence


class InferenceDataset(torch.utils.data.Dataset):
    """Loads and prepares one input per item; a failure becomes an item with an ``error`` (not an exception).

    ``load`` is the config's ``LoadImaged`` (a DICOM file, a series folder or a NIfTI file) and
    ``prepare`` the rest of the deterministic preprocessing, which must keep MetaTensors so that
    the evidence map can be inverted back onto the input's grid. A frame of a multi-frame file is
    decoded alone (``transforms.dicom.dicom_frame``).

    An item: ``index``, ``image`` (the prepared network input, a MetaTensor (C, S, S[, S])), and for
    the writers, so that nothing is decoded twice: ``sources`` (the DICOM headers made conformant,
    without pixel data), ``display`` (the decoded source as uint8 RGB on the input grid, see
    ``bundle.visualize.display_rgb``; None for NIfTI) and ``notes`` (what conformance changed).
    """

    def __init__(self, inputs: list[InferenceInput], load, prepare: Compose, spatial_dims: int):
        self.inputs = inputs
        self.load = load
        self.prepare = prepare
        self.spatial_dims = spatial_dims
        self._file = None  # (path, header, conformant copy, notes) of the multi-frame file whose frames come now

    def __len__(self) -> int:
        return len(self.inputs)

    def _frame_of(self, item: InferenceInput) -> tuple[dict, dict, list, list]:
        """A frame of a multi-frame file: consecutive frames (one batch, one worker) share its header and
        its conformant copy, made without the per-frame functional groups (a frame's writers do not use
        them, and a copy per frame of every frame's groups would cost the square of the frame count)."""
        path = item.files[0]
        if self._file is None or self._file[0] != path:
            header = read_dicom(path, defer_size="1 KB")
            self._file = (path, header, *conformant(header, skip={PER_FRAME_GROUPS}))
        _, header, source, notes = self._file
        image, _ = dicom_frame(path, item.frame, header)
        return {"image": image}, image_description(header), [source], notes

    def _loaded(self, item: InferenceInput) -> tuple[dict, dict | None, list, list]:
        """The loaded image ({"image": MetaTensor, channel last}), the ``image_description`` of its (first)
        DICOM header, the input's DICOM headers made conformant (``bundle.writers.conformance``, no pixel
        data) and the notes of what that changed. NIfTI: no description, no headers."""
        if item.kind == "dicom-frame":
            return self._frame_of(item)
        headers = [read_dicom(f, defer_size="1 KB") for f in item.files] if item.kind.startswith("dicom") else []
        sources, notes = [], []
        for header in headers:
            source, changes = conformant(header)
            sources.append(source)
            notes += [note for note in changes if note not in notes]
        if item.kind == "dicom-series":
            # the series' own files only: its folder may hold other series (MONAI stacks a whole folder)
            with tempfile.TemporaryDirectory() as folder:
                for i, path in enumerate(item.files):
                    os.symlink(Path(path).resolve(), Path(folder) / f"{i:05d}.dcm")
                return self.load({"image": folder}), image_description(headers[0]), sources, notes
        return self.load({"image": str(item.files[0])}), image_description(headers[0]) if headers else None, sources, notes

    def __getitem__(self, index: int) -> dict:
        try:
            loaded, description, sources, notes = self._loaded(self.inputs[index])
            dims = spatial_dims(loaded["image"])
            if dims != self.spatial_dims:
                return {"index": index, "error": f"a {dims}D image cannot be the input of a {self.spatial_dims}D model"}
            display = display_rgb(loaded["image"].numpy(), description) if description else None
            image = self.prepare(loaded)["image"]
            if not isinstance(image, MetaTensor) or not image.applied_operations:
                raise RuntimeError("preprocessing must keep MetaTensors (track_meta) to map evidence back")
            return {"index": index, "image": image, "sources": sources, "display": display, "notes": notes}
        except Exception as err:  # any load or preprocessing failure is this input's, not the run's
            return {"index": index, "error": plain_reason(err)}


def spatial_dims(image: MetaTensor) -> int:
    """Spatial dimensions of a loaded (not yet channel-first) image: a channel axis, if any, is marked."""
    channel_dim = image.meta.get("original_channel_dim", float("nan"))
    has_channel = not (isinstance(channel_dim, float) and math.isnan(channel_dim)) and channel_dim != "no_channel"
    return image.ndim - int(has_channel)


def plain_reason(err: BaseException) -> str:
    """The innermost cause of an error, without the values it may quote (they can be patient data):
    MONAI wraps a transform's exception in "applying transform ..."."""
    while err.__cause__ is not None:
        err = err.__cause__
    return redact(f"{type(err).__name__}: {err}")


def network_image(image: MetaTensor) -> np.ndarray:
    """The network input (C, S, S[, S]) in [0, 1] as float32 numpy for overlays (channel 0)."""
    return image[0].detach().cpu().numpy().astype(np.float32)


def collate(items: list[dict]) -> list[dict]:
    return items  # inputs keep their own geometry and sources: batch them in the run loop
