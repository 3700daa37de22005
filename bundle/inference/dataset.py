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

    def __len__(self) -> int:
        return len(self.inputs)

    def _loaded(self, item: InferenceInput) -> tuple[dict, list]:
        """The loaded image ({"image": MetaTensor, channel last}) and the input's DICOM headers (pixel data left on disk)."""
        if item.kind == "dicom-frame":
            image, header = dicom_frame(item.files[0], item.frame)
            return {"image": image}, [header]
        headers = [read_dicom(f, defer_size="1 KB") for f in item.files] if item.kind.startswith("dicom") else []
        if item.kind == "dicom-series":
            # the series' own files only: its folder may hold other series (MONAI stacks a whole folder)
            with tempfile.TemporaryDirectory() as folder:
                for i, path in enumerate(item.files):
                    os.symlink(Path(path).resolve(), Path(folder) / f"{i:05d}.dcm")
                return self.load({"image": folder}), headers
        return self.load({"image": str(item.files[0])}), headers

    def __getitem__(self, index: int) -> dict:
        try:
            loaded, headers = self._loaded(self.inputs[index])
            dims = spatial_dims(loaded["image"])
            if dims != self.spatial_dims:
                return {"index": index, "error": f"a {dims}D image cannot be the input of a {self.spatial_dims}D model"}
            display = display_rgb(loaded["image"].numpy(), image_description(headers[0])) if headers else None
            sources, notes = [], []
            for header in headers:
                source, changes = conformant(header)
                sources.append(source)
                notes += [note for note in changes if note not in notes]
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
