"""Evidence maps as NIfTI on the input's own grid: the float values (raw or contrast maps, as the run
writes them), for software and for overlaying in a viewer."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from bundle.files import write_durably
from bundle.writers.base import EvidenceCase, EvidenceWriter, WrittenOutput


class NiftiMapWriter(EvidenceWriter):
    """``maps/<stem>[_class<k>]_evidence.nii.gz`` per written class: the float32 evidence (X, Y[, Z])
    with the input's RAS affine, so it lies on the source image in any NIfTI viewer."""

    kind = "nifti"

    def __init__(self, folder: str = "maps", compress_level: int = 1):
        self.folder = folder
        # gzip level: 1 is nibabel's own default; 0 stores the map uncompressed inside the .gz (for large 3D maps,
        # where compressing costs seconds), 9 packs smallest at several times the CPU
        self.compress_level = compress_level

    def file_names(self, case: EvidenceCase) -> list[str]:
        return [f"{self.folder}/{case.stem}{case.suffix(k)}_evidence.nii.gz" for k in case.classes]

    def write(self, case: EvidenceCase, output_dir: Path) -> list[WrittenOutput]:
        written = []
        for k, name in zip(case.classes, self.file_names(case)):
            image = nib.Nifti1Image(np.asarray(case.evidence[k], dtype=np.float32), np.asarray(case.affine, np.float64))
            # the .nii.gz file nib.save writes, made in memory and written once (mtime 0: the same map, the same bytes)
            data = gzip.compress(image.to_bytes(), compresslevel=self.compress_level, mtime=0)
            write_durably(Path(output_dir) / name, data)
            written.append(WrittenOutput(name, class_index=k))
        return written
