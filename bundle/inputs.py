"""What an inference run takes from a folder: DICOM files, series, multi-frame objects and NIfTI files.

Bad files do not stop discovery: each becomes an ``InputFailure`` with a plain reason, and the
rest are still found.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom

from bundle.data import NIFTI_SUFFIXES, dicom_header, image_problem


@dataclass(frozen=True)
class InferenceInput:
    """One model input. ``files``: the file, or a series' files in slice order; ``frame``: the frame
    of a multi-frame file a 2D model sees (None: the whole file or series)."""

    kind: str  # "nifti", "dicom", "dicom-frame", "dicom-series", "dicom-multiframe"
    files: tuple[Path, ...]
    frame: int | None = None

    @property
    def name(self) -> str:
        """The input as it is reported: the file (with its frame) or the series folder's files' parent."""
        where = self.files[0] if len(self.files) == 1 else self.files[0].parent
        return f"{where}" + (f"#frame{self.frame + 1}" if self.frame is not None else "")


@dataclass(frozen=True)
class InputFailure:
    path: Path
    reason: str


def _slice_order(ds: pydicom.Dataset) -> tuple:
    """Sort key of a series member: position along the slice normal, else InstanceNumber."""
    if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
        import numpy as np

        row, col = np.reshape(np.asarray(ds.ImageOrientationPatient, float), (2, 3))
        return (0, float(np.dot(np.cross(row, col), np.asarray(ds.ImagePositionPatient, float))))
    return (1, int(ds.get("InstanceNumber") or 0))


def discover_inputs(input_dir: str | Path, spatial_dims: int) -> tuple[list[InferenceInput], list[InputFailure]]:
    """Find every input under ``input_dir`` (recursively, in a stable order) for a 2D or 3D model.

    - NIfTI files are one input each.
    - 3D models: the single-frame DICOM files of one SeriesInstanceUID form one input, in slice
      order; a multi-frame DICOM file is one input; a lone single-frame image is a failure.
    - 2D models: each single-frame DICOM file is one input; each frame of a multi-frame file is one.
    Unreadable, truncated, empty or non-DICOM files, DICOM without pixel data and unsupported
    transfer syntaxes become failures naming the file.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {root}")
    inputs: list[InferenceInput] = []
    failures: list[InputFailure] = []
    series: dict[str, list[tuple[tuple, Path]]] = defaultdict(list)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.name.endswith(NIFTI_SUFFIXES):
            problem = image_problem(path)
            if problem:
                failures.append(InputFailure(path, problem))
            else:
                inputs.append(InferenceInput("nifti", (path,)))
            continue
        ds, problem = dicom_header(path, unreadable="not a readable DICOM or NIfTI file")
        if problem:
            failures.append(InputFailure(path, problem))
            continue
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            if spatial_dims == 3:
                inputs.append(InferenceInput("dicom-multiframe", (path,)))
            else:
                inputs += [InferenceInput("dicom-frame", (path,), frame=f) for f in range(frames)]
        elif spatial_dims == 2:
            inputs.append(InferenceInput("dicom", (path,)))
        else:
            series[str(ds.get("SeriesInstanceUID", path))].append((_slice_order(ds), path))
    for members in series.values():
        if len(members) == 1:
            failures.append(InputFailure(members[0][1], "a single 2D image cannot be the input of a 3D model"))
        else:
            inputs.append(InferenceInput("dicom-series", tuple(p for _, p in sorted(members))))
    return inputs, failures
