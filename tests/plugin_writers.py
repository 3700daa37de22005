"""A writer plug-in as a user (or the Structured Report writer to come) adds one: listed after the Secondary
Capture and Parametric Map writers in the config, it reads what they wrote for the same input."""

import json
import os
from pathlib import Path

from bundle.files import atomic_write
from bundle.writers import EvidenceCase, EvidenceWriter, WrittenOutput


class ReferenceListWriter(EvidenceWriter):
    """``references/<stem>.json``: the predicted class, its probability, the source SOP Instance UIDs and
    every DICOM object the earlier writers wrote for the input (kind, class, SOP Class / Instance UIDs)."""

    kind = "references"

    def skip_reason(self, case: EvidenceCase) -> str | None:
        return None if case.sources else "no DICOM source: no reference list"

    def file_names(self, case: EvidenceCase) -> list[str]:
        return [f"references/{case.stem}.json"]

    def write(self, case: EvidenceCase, output_dir: Path) -> list[WrittenOutput]:
        (name,) = self.file_names(case)
        listing = {
            "predicted_class": case.predicted_class,
            "probability": case.probabilities[case.predicted_class],
            "sources": [str(ds.SOPInstanceUID) for ds in case.sources],
            "objects": [{"kind": kind, "path": w.path, "class": w.class_index, "sop_class_uid": w.sop_class_uid,
                         "sop_instance_uid": w.sop_instance_uid, "series_instance_uid": w.series_instance_uid}
                        for kind, written in case.written.items() for w in written if w.sop_instance_uid],
        }
        with atomic_write(Path(output_dir) / name) as tmp:
            tmp.write_text(json.dumps(listing))
        return [WrittenOutput(name, case.predicted_class)]


class ProcessKillingWriter(EvidenceWriter):
    """Ends the process it writes in, without a word, for the input whose stem is ``stem`` (as the kernel's
    out-of-memory killer would); writes nothing for the others."""

    kind = "killer"

    def __init__(self, stem: str):
        self.stem = stem

    def file_names(self, case: EvidenceCase) -> list[str]:
        return []

    def write(self, case: EvidenceCase, output_dir: Path) -> list[WrittenOutput]:
        if case.stem == self.stem:
            os._exit(9)
        return []
