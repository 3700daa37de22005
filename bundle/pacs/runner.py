"""Run the bundle's inference config over a folder of retrieved or received DICOM files.

It runs as a child process, ``python -m monai.bundle run --config_file configs/inference.json``,
not in the node's own process, because:

- the DICOM node must keep answering associations while a series is processed; the inference's
  Python-heavy writers (pydicom, highdicom, PNG and NIfTI encoding) would hold the GIL in the
  node's process, and its DataLoader workers would be forked from a process running pynetdicom's
  server threads, which is unsafe;
- a crash or an out-of-memory kill in inference ends that job, not the node, and memory returns to
  the system after every job; ``stop`` ends a job the node is stopped in, and the job runs again
  when the node restarts (its inputs are still on disk and its output UIDs are the same);
- the child's environment has no PACS credential variable, so nothing it logs or sends to MLflow
  can carry one.

The price is the start-up of PyTorch and MONAI per job (seconds), small against a series' idle time.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bundle.pacs.config import REPOSITORY, InferenceSettings

INPUTS_FAILED = 2  # bundle.inference.InputsFailed: some inputs failed, the rest were written


class InferenceFailed(RuntimeError):
    """The inference process failed as a whole; the message names its log."""


class InferenceStopped(InferenceFailed):
    """The inference was ended by ``stop``: not the job's fault, it runs again after a restart."""


@dataclass(frozen=True)
class InferenceOutcome:
    """Counts from the run's ``predictions.csv`` and ``failures.csv``, and where its log is."""

    processed: int
    failed: int
    log: Path


def _cli_value(value) -> str:
    """A config override as ``monai.bundle run`` (python-fire) reads it back: Python literals."""
    return value if isinstance(value, str) else repr(value)


def _rows(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


class InferenceRunner:
    """Runs ``settings.config_file`` over ``input_dir`` into ``output_dir``; ``secret_variables`` are
    environment variables the child must not see."""

    def __init__(self, settings: InferenceSettings, secret_variables: tuple[str, ...] = ()):
        self.settings = settings
        self.secret_variables = set(secret_variables)
        self._process: subprocess.Popen | None = None
        self._stopping = False

    def command(self, input_dir: Path, output_dir: Path) -> list[str]:
        """The ``monai.bundle run`` command line; the bundle's files are taken relative to the bundle,
        the checkpoint and the folders relative to the working directory."""
        s = self.settings
        command = [sys.executable, "-m", "monai.bundle", "run",
                   "--config_file", str(REPOSITORY / s.config_file), "--meta_file", str(REPOSITORY / s.meta_file),
                   "--logging_file", str(REPOSITORY / s.logging_file),
                   "--input_dir", str(Path(input_dir).resolve()), "--output_dir", str(Path(output_dir).resolve()),
                   "--ckpt_path", str(Path(s.ckpt_path).expanduser().resolve())]
        for key, value in s.overrides.items():
            command += [f"--{key}", _cli_value(value)]
        if s.tracking_uri:
            command += ["--tracking_uri", s.tracking_uri]
        else:
            command += ["--inference_tracking", "$None"]  # no MLflow run for PACS jobs unless a store is configured
        return command

    def run(self, input_dir: Path, output_dir: Path, log_path: Path) -> InferenceOutcome:
        """Run to the end; raise InferenceFailed unless every input, or all but the bad ones, went through."""
        environment = {k: v for k, v in os.environ.items() if k not in self.secret_variables}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            # the bundle's configs refer to each other by paths relative to the bundle root
            self._process = subprocess.Popen(self.command(input_dir, output_dir), cwd=REPOSITORY, env=environment,
                                             stdout=log, stderr=subprocess.STDOUT)
            try:
                status = self._process.wait()
            finally:
                self._process = None
        if self._stopping:
            raise InferenceStopped("inference was stopped")
        if status not in (0, INPUTS_FAILED):
            raise InferenceFailed(f"inference exited with status {status}: see {log_path}")
        return InferenceOutcome(_rows(output_dir / "predictions.csv"), _rows(output_dir / "failures.csv"), log_path)

    def stop(self) -> None:
        """End a running inference (the node is stopping); its job runs again after a restart."""
        self._stopping = True
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
