"""The writer plug-in interface: what one input produced, and what a writer makes of it.

The inference run builds one ``EvidenceCase`` per input and hands it to each writer listed in the
config (``writers`` in configs/inference.json), in that order. A writer says whether it applies to
the case (``skip_reason``), which files it writes (``file_names``) and writes them (``write``),
returning a ``WrittenOutput`` per file; these are appended to ``case.written`` under the writer's
``kind``, so a later writer sees what earlier ones wrote for the same input: a Structured Report
writer listed after the Secondary Capture and Parametric Map writers finds their SOP Class and
Instance UIDs there, beside the probabilities, the maps and the source datasets.

A writer adds or changes nothing else in the case, and writes through ``bundle.files.atomic_write``.
It runs in a writer process (``bundle.inference.writing``), concurrently with other cases in other
processes (never with itself on one case); what it returns goes back through a pipe, so it must pickle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pydicom

from bundle.inputs import InferenceInput
from bundle.writers.common import ModelIdentity


@dataclass(frozen=True)
class WrittenOutput:
    """One file a writer wrote: ``path`` relative to the output folder; for a DICOM object its UIDs."""

    path: str
    class_index: int | None = None  # the class whose evidence it shows; None: not one class's
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    series_instance_uid: str = ""


@dataclass
class EvidenceCase:
    """What one input produced, as writers see it. Arrays are numpy, on the CPU.

    - ``evidence``: class maps (C, X, Y[, Z]) float32 on the input's own grid (the preprocessing's
      spatial transforms inverted), with its RAS ``affine`` (4, 4); MONAI's axis order: column, row, slice.
    - ``network_image``: what the network saw, channel 0, (S, S[, S]) in [0, 1];
      ``network_maps``: the class maps (C, S, S[, S]) on that grid.
    - ``sources``: the input's DICOM headers (no pixel data; patient, study and geometry made
      conformant by ``bundle.writers.conformance``); empty for NIfTI. A series' files in slice order.
    - ``source_display``: the source pixels as people see them, uint8 RGB (X, Y[, Z], 3) on the input
      grid (window, MONOCHROME1 and palette applied), decoded once by the loader; None for NIfTI.
    - ``classes``: the classes whose evidence is written (the predicted one, or all).
    - ``notes``: what was dropped or repaired from the sources (attribute names only, never values).
    """

    input: InferenceInput
    stem: str
    probabilities: list[float]
    predicted_class: int
    classes: tuple[int, ...]
    evidence: np.ndarray
    affine: np.ndarray
    network_image: np.ndarray
    network_maps: np.ndarray
    model: ModelIdentity
    class_names: dict[int, str] = field(default_factory=dict)
    sources: list[pydicom.Dataset] = field(default_factory=list)
    source_display: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    written: dict[str, list[WrittenOutput]] = field(default_factory=dict)

    def class_name(self, k: int) -> str:
        return self.class_names.get(k, f"class {k}")

    def suffix(self, k: int) -> str:
        """File-name suffix of class ``k``'s outputs: none for the predicted class alone, else ``_class<k>``."""
        return "" if self.classes == (self.predicted_class,) and k == self.predicted_class else f"_class{k}"


class EvidenceWriter(ABC):
    """One kind of output of an inference run. Subclasses set ``kind`` (its key in predictions.json)
    and take their options as constructor keywords, so a config can list and configure them."""

    kind: ClassVar[str]

    def skip_reason(self, case: EvidenceCase) -> str | None:
        """Why this writer writes nothing for ``case`` (logged once per reason and run), or None."""
        return None

    @abstractmethod
    def file_names(self, case: EvidenceCase) -> list[str]:
        """The files ``write`` writes for ``case``, relative to the output folder (deterministic)."""

    @abstractmethod
    def write(self, case: EvidenceCase, output_dir: Path) -> list[WrittenOutput]:
        """Write this writer's files for ``case`` under ``output_dir``; one ``WrittenOutput`` per file."""

    def signature(self) -> str:
        """The writer and its options: a rerun with another signature writes its inputs again."""
        options = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()))
        return f"{type(self).__module__}.{type(self).__qualname__}({options})"
