"""From the input grid back to the source images: which plane of a map belongs to which DICOM image."""

from __future__ import annotations

import numpy as np
import pydicom

from bundle.writers.base import EvidenceCase
from transforms.dicom import frame_slices, is_enhanced_volume


def source_images(case: EvidenceCase) -> list[tuple[pydicom.Dataset, int]]:
    """(source dataset, 0-based frame) of every DICOM image of the input, in file and frame order."""
    kind, sources = case.input.kind, case.sources
    if kind == "dicom-series":
        return [(ds, 0) for ds in sources]
    if kind == "dicom-multiframe":
        return [(sources[0], f) for f in range(int(sources[0].NumberOfFrames))]
    return [(sources[0], case.input.frame or 0)]


def source_planes(case: EvidenceCase, volume: np.ndarray) -> np.ndarray:
    """``volume`` on the input grid, (X, Y[, Z][, ...]) as MONAI lays it out (column, row, slice), cut
    into the planes of ``source_images(case)``: (n, rows, cols[, ...]).

    - one image or frame: the grid is its (cols, rows);
    - a multi-frame file: an enhanced volume's frames lie at the slices of their plane positions,
      other multi-frame images (ultrasound, NM, multi-frame SC) frame by frame;
    - a series: MONAI's PydicomReader stacks it in InstanceNumber order (a stable sort of the files it
      was given, which are ``case.sources`` in this order), so slice k is the k-th of that sort.
    """
    kind, sources = case.input.kind, case.sources
    if kind not in ("dicom-series", "dicom-multiframe"):
        return np.swapaxes(volume, 0, 1)[None]
    depth = volume.shape[2]
    if kind == "dicom-multiframe":
        ds = sources[0]
        slices = frame_slices(ds, case.affine) if is_enhanced_volume(ds) else list(range(depth))
        if len(slices) != depth or sorted(slices) != list(range(depth)):
            raise ValueError(f"the frames of the source do not map one to one onto the {depth} slices of the map")
    else:
        if depth != len(sources):
            raise ValueError(f"the loaded volume has {depth} slices, the series {len(sources)} files")
        volume_order = sorted(range(len(sources)), key=lambda i: int(sources[i].get("InstanceNumber") or 0))
        slice_of_file = {file_index: k for k, file_index in enumerate(volume_order)}
        slices = [slice_of_file[i] for i in range(len(sources))]
    return np.stack([np.swapaxes(volume[:, :, s], 0, 1) for s in slices])
