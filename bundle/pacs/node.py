"""A DICOM node: a Store SCP that receives images, groups them by series, runs inference on every
series that is complete (no new instance for ``idle_seconds``) and forwards the results.

Nothing acknowledged is lost: an instance is written to ``incoming_dir/<series>/`` and flushed to
disk before the success status goes back. A complete series moves (one rename) to
``work_dir/listen/<job id>/`` and becomes a job; a restarted node finds unfinished series in
``incoming_dir``, unfinished jobs in ``work_dir/listen`` and undelivered results in the outbox, and
carries on. At most ``queue_size`` instances wait in ``incoming_dir``; beyond that an instance is
refused with 0xA700 (out of resources) before anything is written. A dataset that cannot be
parsed (0xC210) or has no pixel data or UIDs (0xA900) is refused and logged by what was wrong and
who sent it, never by patient data or UIDs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from bundle.pacs.config import PacsConfig, PacsConfigError
from bundle.pacs.outbox import Job, JobBusy, deliver, jobs_in, new_job_id
from bundle.pacs.pipeline import infer_and_deliver, sender_for
from bundle.pacs.protocol import PacsError, instance_file_name, quiet_network_loggers, write_durably
from bundle.pacs.runner import InferenceFailed, InferenceRunner, InferenceStopped

logger = logging.getLogger(__name__)

OUT_OF_RESOURCES, DOES_NOT_MATCH_SOP_CLASS, CANNOT_UNDERSTAND = 0xA700, 0xA900, 0xC210
PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def decodable_transfer_syntaxes() -> list[str]:
    """Transfer syntaxes whose pixel data pydicom can decode here: the only ones offered, so that a
    sender falls back to one the inference can read."""
    usable = []
    for syntax in ALL_TRANSFER_SYNTAXES:
        try:
            if get_decoder(syntax).is_available:
                usable.append(syntax)
        except NotImplementedError:
            continue
    return usable


def series_folder_name(series_uid: str) -> str:
    """Groups a series' instances on disk without spelling out its UID."""
    return hashlib.sha256(series_uid.encode()).hexdigest()[:24]


def dataset_problem(ds) -> str | None:
    """Why a received dataset cannot be an inference input, in words without patient data; None if fine."""
    missing = [keyword for keyword in REQUIRED_UIDS if not ds.get(keyword)]
    if missing:
        return f"no {', '.join(missing)}"
    if not any(keyword in ds for keyword in PIXEL_DATA):
        return "no pixel data"
    if not ds.get("Rows") or not ds.get("Columns"):
        return "no image size (Rows, Columns)"
    return None


@dataclass
class SeriesArrivals:
    """A series waiting in ``incoming_dir``: instances on disk, writes under way, time of the last one."""

    count: int = 0
    writing: int = 0
    last_arrival: float = 0.0


class StorageNode:
    """The listener of ``scripts/pacs.py listen``: ``start`` returns once it is listening; ``stop``."""

    def __init__(self, config: PacsConfig, poll_seconds: float = 0.2):
        self.config = config
        self.settings = config.listen
        self.incoming = config.incoming_dir
        self.work = config.work_dir / "listen"
        self.poll_seconds = poll_seconds
        self.runner = InferenceRunner(config.inference, config.secret_environment_variables)
        self.sender = sender_for(config, self.settings.destination, self.settings.send_with)
        self._lock = threading.Lock()
        self._series: dict[str, SeriesArrivals] = {}
        self._writing: set[Path] = set()
        self._queued = 0
        self._recovered: list[Path] = []
        self._stop = threading.Event()
        self._server = None
        self._worker: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        quiet_network_loggers()
        self._recover()
        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True
        if self.settings.accept_from:
            ae.require_calling_aet = list(self.settings.accept_from)
        syntaxes = decodable_transfer_syntaxes()
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        self._server = ae.start_server((self.config.bind_address, self.config.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self._worker = threading.Thread(target=self._work, name="pacs-node-worker", daemon=True)
        self._worker.start()
        logger.info("listening as %s on %s:%d; a series is complete after %.1f s without a new instance; results go "
                    "to %s; %d instance(s) and %d job(s) carried over", self.config.ae_title, self.config.bind_address,
                    self.config.port, self.settings.idle_seconds, self.sender.description, self._queued,
                    len(self._recovered))

    def stop(self) -> None:
        """Stop listening, end a running inference (its job runs again after a restart), wait for the worker."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        self.runner.stop()
        if self._worker is not None:
            self._worker.join()
        logger.info("stopped; %d instance(s) wait in %s", self._queued, self.incoming)

    def _recover(self) -> None:
        """Pick up what a previous run left: series in ``incoming``, jobs in ``work``."""
        now = time.monotonic()
        if self.incoming.is_dir():
            for folder in sorted(self.incoming.iterdir()):
                for partial in folder.glob("*.part"):  # never acknowledged: the sender was told it failed
                    partial.unlink()
                count = len(list(folder.glob("*.dcm")))
                if count:
                    self._series[folder.name] = SeriesArrivals(count=count, last_arrival=now)
                    self._queued += count
                else:
                    shutil.rmtree(folder, ignore_errors=True)
        if self.work.is_dir():
            for folder in sorted(self.work.iterdir()):
                job_file = self.config.outbox_dir / folder.name / "job.json"
                if not job_file.is_file():
                    self._recovered.append(folder)  # received, never inferred (or stopped mid-way)
                elif Job.load(job_file.parent).stage == "inferred":
                    shutil.rmtree(folder, ignore_errors=True)  # inferred before the stop: only the clean-up was left
                # else the inference failed: the inputs stay for someone to look at

    # -- receiving ------------------------------------------------------------------------------

    def _on_store(self, event) -> int:
        """EVT_C_STORE: check, write durably, then acknowledge; a status code for every outcome."""
        sender = event.assoc.requestor.ae_title
        with self._lock:
            if self._queued >= self.settings.queue_size:
                logger.warning("queue full (%d instances waiting): refused an instance from %s (0xA700)",
                               self._queued, sender)
                return OUT_OF_RESOURCES
        try:
            ds = event.dataset
            problem = dataset_problem(ds)
        except Exception as err:  # pydicom parses lazily: any error here means the bytes are not a dataset
            logger.warning("refused an instance from %s: it cannot be parsed (%s)", sender, type(err).__name__)
            return CANNOT_UNDERSTAND
        if problem:
            kind = UID(str(ds.get("SOPClassUID", ""))).name or "unknown SOP class"
            logger.warning("refused a %s instance from %s: %s", kind, sender, problem)
            return DOES_NOT_MATCH_SOP_CLASS
        key = series_folder_name(str(ds.SeriesInstanceUID))
        path = self.incoming / key / instance_file_name(str(ds.SOPInstanceUID))
        with self._lock:
            new = not path.exists() and path not in self._writing  # the same instance again replaces its file
            if new and self._queued >= self.settings.queue_size:
                logger.warning("queue full (%d instances waiting): refused an instance from %s (0xA700)",
                               self._queued, sender)
                return OUT_OF_RESOURCES
            self._queued += int(new)
            series = self._series.setdefault(key, SeriesArrivals())
            series.writing += 1
            self._writing.add(path)
        try:
            write_durably(path, event.encoded_dataset())
            written = True
        except OSError as err:
            logger.error("cannot write a received instance into %s: %s (0xA700)", self.incoming, err.strerror)
            written = False
        with self._lock:
            self._writing.discard(path)
            series.writing -= 1
            series.last_arrival = time.monotonic()
            if written:
                series.count += int(new)
            else:
                self._queued -= int(new)
        return 0x0000 if written else OUT_OF_RESOURCES

    # -- processing -----------------------------------------------------------------------------

    def _claim_complete_series(self) -> Path | None:
        """Move one complete series from ``incoming`` to a new job's work folder (a rename)."""
        with self._lock:
            now = time.monotonic()
            for key, series in self._series.items():
                if series.writing or now - series.last_arrival < self.settings.idle_seconds:
                    continue
                del self._series[key]
                self._queued -= series.count
                if not series.count:
                    return None
                work = self.work / new_job_id()
                work.parent.mkdir(parents=True, exist_ok=True)
                os.rename(self.incoming / key, work)  # incoming_dir and work_dir must be on one file system
                logger.info("series complete: %d instance(s) -> job %s", series.count, work.name)
                return work
        return None

    def _work(self) -> None:
        next_resend = time.monotonic()  # undelivered results of earlier runs first
        while not self._stop.is_set():
            work = self._recovered.pop(0) if self._recovered else self._claim_complete_series()
            if work is not None:
                self._process(work)
                continue
            if time.monotonic() >= next_resend:
                self._resend_pending()
                next_resend = time.monotonic() + self.settings.resend_every_seconds
            self._stop.wait(self.poll_seconds)

    def _process(self, work: Path) -> None:
        try:
            result = infer_and_deliver(self.config, work.name, work, "listen", self.settings.destination,
                                       self.settings.send_with, runner=self.runner)
        except InferenceStopped:
            return
        except (InferenceFailed, PacsError, OSError) as err:  # messages name endpoints and logs, never UIDs
            logger.error("job %s failed: %s", work.name, err)
            return
        except Exception as err:  # the node goes on; the message could hold a result's file name (a UID): not logged
            logger.error("job %s failed (%s); a restart runs it again if its inputs are still in %s", work.name,
                         type(err).__name__, work.parent)
            return
        for line in result.lines():
            logger.info("%s", line)

    def _resend_pending(self) -> None:
        for job in jobs_in(self.config.outbox_dir):
            if self._stop.is_set():
                return
            if job.stage != "inferred" or not job.pending():
                continue
            try:
                result = deliver(job, sender_for(self.config, job.destination, job.send_with), self.config.retry)
            except (JobBusy, PacsError, PacsConfigError) as err:
                logger.warning("job %s: %s", job.job_id, err)
                continue
            logger.info("resent job %s: %d pending", job.job_id, sum(result.pending.values()))
