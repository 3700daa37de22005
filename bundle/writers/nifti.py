"""Evidence maps as NIfTI on the input's own grid: the raw values, for software and for overlaying in a viewer."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from bundle.files import atomic_write
from bundle.writers.base import EvidenceCase, EvidenceWriter, WrittenOutput


class NiftiMapWriter(EvidenceWriter):
    """``maps/<stem>[_class<k>]_evidence.nii.gz`` per written class: the float32 evidence (X, Y[, Z])
    with the input's RAS affine, so it lies on the source image in any NIfTI viewer."""

    kind = "nifti"

    def __init__(self, folder: str = "maps"):
        self.folder = folder

    def file_names(self, case: EvidenceCase) -> list[str]:
        return [f"{self.folder}/{case.stem}{case.suffix(k)}_evidence.nii.gz" for k in case.classes]

    def write(self, case: EvidenceCase, output_dir: Path) -> list[WrittenOutput]:
        written = []
        for k, name in zip(case.classes, self.file_names(case)):
            image = nib.Nifti1Image(np.asarray(case.evidence[k], dtype=np.float32), np.asarray(case.affine, np.float64))
            with atomic_write(Path(output_dir) / name) as tmp:
                gz = f"{tmp}.nii.gz"  # nibabel picks the format (and gzip) from the suffix
                nib.save(image, gz)
                os.replace(gz, tmp)
            written.append(WrittenOutput(name, class_index=k))
        return written
