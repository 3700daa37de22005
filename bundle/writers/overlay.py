"""A PNG of the predicted class's evidence over what the network saw: a quick look, no DICOM viewer needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bundle.files import atomic_write
from bundle.visualize import blend_evidence, display_plane
from bundle.writers.base import EvidenceCase, EvidenceWriter, WrittenOutput


class OverlayPngWriter(EvidenceWriter):
    """``overlays/<stem>.png``: the network input (channel 0, grey) with the predicted class's map
    (jet, opacity growing with the evidence); 3D inputs at the slice of the map's maximum."""

    kind = "png"

    def __init__(self, folder: str = "overlays", compress_level: int = 1):
        self.folder = folder
        self.compress_level = compress_level  # 1: a third of the CPU of PIL's default 6, files ~20% larger

    def file_names(self, case: EvidenceCase) -> list[str]:
        return [f"{self.folder}/{case.stem}.png"]

    def write(self, case: EvidenceCase, output_dir: Path) -> list[WrittenOutput]:
        (name,) = self.file_names(case)
        plane, heat = display_plane(case.network_image, case.network_maps[case.predicted_class])
        overlay = blend_evidence(np.repeat(plane[..., None], 3, axis=-1), heat)
        with atomic_write(Path(output_dir) / name) as tmp:
            Image.fromarray(overlay).save(tmp, format="PNG", compress_level=self.compress_level)
        return [WrittenOutput(name, class_index=case.predicted_class)]
