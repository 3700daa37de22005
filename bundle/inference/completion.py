"""Resuming an inference run: a completion record per input, written after all its outputs.

A rerun over the same folder into the same output folder with the same model and writers skips
every input whose record is valid, and takes its row of the tables from the record. Valid, checked
cheaply (no output is decoded):

- the record parses and was written for this run's ``signature`` (model name, version and weights
  digest, classes written, class names, each writer with its options);
- every file of the input has the size and modification time it had (a replaced source is redone);
- every output the record lists exists with the size it had when it was written.

Records are written with ``bundle.files.atomic_write`` once the last output of the input is on disk,
so an interrupted run leaves no record for an input it had not finished: that input is done again,
and its outputs, whose names are deterministic, are replaced rather than duplicated.
Records live in ``output_dir/.completed/`` (one small JSON file per input, named by a hash of the
input's paths and frame) beside the outputs, never under the folders the PACS node sends.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bundle.files import atomic_write
from bundle.inputs import InferenceInput

RECORDS_DIR = ".completed"


def _file_state(path: Path) -> list:
    stat = Path(path).stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


class CompletionRecords:
    """The completion records of one output folder for runs with one ``signature``."""

    def __init__(self, output_dir: Path, signature: str):
        self.output_dir = Path(output_dir)
        self.folder = self.output_dir / RECORDS_DIR
        self.signature = signature

    def _path(self, item: InferenceInput) -> Path:
        key = json.dumps([[str(f) for f in item.files], item.frame])
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    def record(self, item: InferenceInput, probabilities: list[float], predicted_class: int,
               outputs: dict[str, list[str]], notes: list[str]) -> None:
        """Record ``item`` as done: call after every output listed in ``outputs`` is written."""
        sizes = {name: (self.output_dir / name).stat().st_size for names in outputs.values() for name in names}
        record = {"signature": self.signature, "files": [_file_state(f) for f in item.files], "frame": item.frame,
                  "probabilities": probabilities, "predicted_class": predicted_class, "outputs": outputs,
                  "sizes": sizes, "notes": notes}
        with atomic_write(self._path(item)) as tmp:
            tmp.write_text(json.dumps(record))

    def lookup(self, item: InferenceInput) -> dict | None:
        """The record of ``item`` if it is valid for this run (see the module's doc), else None."""
        try:
            record = json.loads(self._path(item).read_text())
            if record["signature"] != self.signature or record["frame"] != item.frame:
                return None
            if record["files"] != [_file_state(f) for f in item.files]:
                return None
            for name, size in record["sizes"].items():
                if (self.output_dir / name).stat().st_size != size:
                    return None
        except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable, half-written by hand, old format
            return None
        return record
