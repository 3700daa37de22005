"""The outbox: every job's results and whether each one reached its destination, kept on disk.

A job is a folder ``outbox_dir/<job id>/`` with ``job.json`` (one entry per result file: its SOP
class and instance UID, ``pending`` or ``delivered``, attempts, the destination's last answer),
the inference outputs under ``results/`` and the inference log. ``deliver`` sends the pending files
with retries and records every answer as it comes, so a stopped command, a restarted node or a
later ``resend`` carries on where it stopped. Sending again is harmless: the files keep the SOP
Instance UIDs the inference derived from the source and the model.
"""

from __future__ import annotations

import fcntl
import json
import logging
import secrets
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pydicom

from bundle.files import atomic_write
from bundle.pacs.config import RetryPolicy
from bundle.pacs.protocol import PacsError, Sender, with_retries
from bundle.pacs.runner import InferenceOutcome

logger = logging.getLogger(__name__)

PENDING, DELIVERED = "pending", "delivered"
RESULT_KINDS = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.30": "Parametric Map",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
}


class JobBusy(RuntimeError):
    """Another process (the node, or a ``resend``) is delivering this job now."""


def new_job_id() -> str:
    """A time-ordered job name that says nothing about the patient or study."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


@dataclass
class ResultFile:
    """One DICOM result of a job and its delivery state."""

    path: str  # relative to the job folder
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    state: str = PENDING
    attempts: int = 0
    status: str = ""  # the destination's last answer, in words
    delivered_to: str = ""


@dataclass
class Job:
    """A job's state as kept in ``job.json``."""

    folder: Path
    job_id: str
    origin: str  # "run" or "listen"
    destination: str  # an endpoint name of the configuration
    send_with: str
    created: str
    stage: str  # "inferred" or "inference-failed"
    processed: int = 0
    failed_inputs: int = 0
    error: str = ""
    files: list[ResultFile] = field(default_factory=list)

    STATE_FILE = "job.json"

    @classmethod
    def from_results(cls, folder: Path, origin: str, destination: str, send_with: str, outcome: InferenceOutcome,
                     results: Path) -> Job:
        """A job for the DICOM files the inference wrote under ``results/dicom`` (all pending), saved."""
        files = []
        for path in sorted((results / "dicom").rglob("*.dcm")):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            files.append(ResultFile(str(path.relative_to(folder)), RESULT_KINDS.get(ds.SOPClassUID, "DICOM"),
                                    str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID),
                                    str(ds.StudyInstanceUID)))
        job = cls(folder, folder.name, origin, destination, send_with, time.strftime("%Y-%m-%dT%H:%M:%S"), "inferred",
                  outcome.processed, outcome.failed, files=files)
        job.save()
        return job

    @classmethod
    def failed(cls, folder: Path, origin: str, destination: str, send_with: str, error: str) -> Job:
        job = cls(folder, folder.name, origin, destination, send_with, time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "inference-failed", error=error)
        job.save()
        return job

    @classmethod
    def load(cls, folder: Path) -> Job:
        state = json.loads((folder / cls.STATE_FILE).read_text())
        state["files"] = [ResultFile(**f) for f in state["files"]]
        return cls(folder=folder, **state)

    def save(self) -> None:
        """Write ``job.json`` whole or not at all (``bundle.files.atomic_write``)."""
        state = asdict(self)
        del state["folder"]
        with atomic_write(self.folder / self.STATE_FILE) as tmp:
            tmp.write_text(json.dumps(state, indent=1))

    def pending(self) -> list[ResultFile]:
        return [f for f in self.files if f.state == PENDING]

    @contextmanager
    def locked(self):
        """Hold the job's lock file so that the node and a ``resend`` never deliver it at once."""
        with open(self.folder / "job.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JobBusy(f"job {self.job_id} is being delivered by another process") from None
            try:
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass
class DeliveryReport:
    """What one delivery of a job achieved: stored counts by kind, what is still pending and why."""

    job_id: str
    folder: Path
    destination: str
    processed: int
    failed_inputs: int
    stored: dict[str, int]
    pending: dict[str, int]
    series: int
    studies: int
    error: str = ""

    @property
    def complete(self) -> bool:
        return not self.pending and not self.error

    def lines(self) -> list[str]:
        """The report in words for people: counts, kinds, destination, and what to do next."""
        lines = [f"job {self.job_id}: {self.processed} input(s) processed, {self.failed_inputs} could not be "
                 f"(see {self.folder / 'results' / 'failures.csv'})" if self.failed_inputs else
                 f"job {self.job_id}: {self.processed} input(s) processed"]
        if self.stored:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.stored.items()))
            lines.append(f"  stored at {self.destination}: {kinds} ({self.series} new series in {self.studies} source "
                         f"study{'ies' if self.studies != 1 else ''})")
        if self.pending:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.pending.items()))
            lines.append(f"  NOT delivered to {self.destination}: {kinds}; kept in {self.folder}"
                         + (f" ({self.error})" if self.error else "") + "; send them later with `resend`")
        elif self.error:
            lines.append(f"  {self.error}")
        lines.append(f"  per-instance record: {self.folder / Job.STATE_FILE}")
        return lines

    def as_dict(self) -> dict:
        return {**asdict(self), "folder": str(self.folder), "complete": self.complete}


def report(job: Job, destination: str, error: str = "") -> DeliveryReport:
    def count(state: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for f in job.files:
            if f.state == state:
                counts[f.kind] = counts.get(f.kind, 0) + 1
        return counts

    delivered = [f for f in job.files if f.state == DELIVERED]
    return DeliveryReport(job.job_id, job.folder, destination, job.processed, job.failed_inputs, count(DELIVERED),
                          count(PENDING), len({f.series_instance_uid for f in delivered}),
                          len({f.study_instance_uid for f in delivered}), error or job.error)


def deliver(job: Job, sender: Sender, policy: RetryPolicy, again: bool = False) -> DeliveryReport:
    """Send the job's pending files (all of them with ``again``) with retries and exponential backoff.

    Each attempt sends what is still pending and records every instance's answer in ``job.json``
    before the next; an attempt that leaves anything pending counts as failed. Raises JobBusy when
    another process holds the job.
    """
    with job.locked():
        if again:
            for f in job.files:
                f.state = PENDING

        def attempt() -> None:
            todo = job.pending()
            if not todo:
                return
            try:
                outcomes = sender.store([job.folder / f.path for f in todo])
            except PacsError as err:
                for f in todo:
                    f.attempts += 1
                    f.status = str(err)
                job.save()
                raise
            for f in todo:
                outcome = outcomes[job.folder / f.path]
                f.attempts += 1
                f.status = outcome.status
                if outcome.stored:
                    f.state, f.delivered_to = DELIVERED, sender.description
            job.save()
            left = job.pending()
            if left:
                raise PacsError(f"{len(left)} of {len(todo)} instance(s) not stored at {sender.description}: "
                                f"{left[0].status}")

        error = ""
        try:
            with_retries(policy, attempt, f"delivery of job {job.job_id}")
        except PacsError as err:
            error = str(err)
            logger.error("job %s: %s", job.job_id, err)
        return report(job, sender.description, error)


def jobs_in(outbox: Path) -> list[Job]:
    """Every job in the outbox, oldest first."""
    if not outbox.is_dir():
        return []
    return [Job.load(folder) for folder in sorted(outbox.iterdir()) if (folder / Job.STATE_FILE).is_file()]
