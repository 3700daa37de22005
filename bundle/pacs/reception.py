"""What the node does with associations and the instances they store, before anything is inferred.

``Gatekeeper`` decides at association time who may call (``listen.accept_from``: the calling AE
title and the address) and writes one audit line per association when it ends. ``Reception``
writes every accepted instance durably into ``incoming_dir/<series>/`` before acknowledging it,
keeps the limits, and groups instances by series until a series is complete.

Limits, each checked before anything is written, so a refusal (0xA700, Out of Resources) never
leaves half a file and never touches what was acknowledged before: instances and bytes per
association, instances (``queue_size``) and bytes waiting in ``incoming_dir``, and the free disk
space that must remain there.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import UID
from pynetdicom import evt

from bundle.pacs.audit import AssociationRecord, AuditTrail
from bundle.pacs.config import ListenSettings
from bundle.pacs.protocol import instance_file_name, write_durably
from bundle.pacs.security import AccessPolicy, reject

logger = logging.getLogger("bundle.pacs.node")

SUCCESS, OUT_OF_RESOURCES, DOES_NOT_MATCH_SOP_CLASS, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC210
PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
ASSOCIATIONS_FILE = ".associations"  # in a series folder: the ids of the associations it came from


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


def associations_of(folder: Path) -> list[str]:
    """The ids of the associations a series folder's instances came from (for the audit trail)."""
    path = folder / ASSOCIATIONS_FILE
    return path.read_text().split() if path.is_file() else []


@dataclass
class SeriesArrivals:
    """A series waiting in ``incoming_dir``: instances and bytes on disk, writes under way, last arrival."""

    count: int = 0
    bytes: int = 0
    writing: int = 0
    last_arrival: float = 0.0
    associations: set[str] = field(default_factory=set)


class Gatekeeper:
    """Decides at association time who may call (``listen.accept_from``) and writes each
    association's audit line when its connection closes; ``handlers`` for pynetdicom."""

    def __init__(self, settings: ListenSettings, audit: AuditTrail, tls: bool):
        self.audit = audit
        self.tls = tls
        self.policy = AccessPolicy(settings.accept_from)  # host names resolve now, once
        self._lock = threading.Lock()
        self._associations: dict[object, AssociationRecord] = {}

    @property
    def handlers(self) -> list[tuple]:
        return [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_REJECTED, self._on_rejected),
                (evt.EVT_RELEASED, self._on_ended), (evt.EVT_ABORTED, self._on_ended),
                (evt.EVT_CONN_CLOSE, self._on_closed)]

    def record(self, assoc) -> AssociationRecord:
        """The record of an association in progress."""
        with self._lock:
            if assoc not in self._associations:  # not announced by EVT_REQUESTED (cannot happen with pynetdicom 2-3)
                self._associations[assoc] = AssociationRecord(assoc.requestor.ae_title.strip(), assoc.requestor.address,
                                                              self.tls)
            return self._associations[assoc]

    def _on_requested(self, event) -> None:
        """EVT_REQUESTED: accept or reject (A-ASSOCIATE-RJ) before any data, by AE title and address."""
        assoc = event.assoc
        record = AssociationRecord(assoc.requestor.primitive.calling_ae_title.strip(), assoc.requestor.address,
                                   self.tls)
        with self._lock:
            self._associations[assoc] = record
        refusal = self.policy.refusal(record.peer_ae_title, record.peer_address)
        if refusal:
            record.result = f"rejected: {refusal}"
            logger.warning("rejected an association from %s at %s: %s", record.peer_ae_title, record.peer_address,
                           refusal)
            reject(assoc)

    def _on_rejected(self, event) -> None:
        """EVT_REJECTED: pynetdicom's own negotiation said no (wrong called AE title, too many associations)."""
        record = self._associations.get(event.assoc)
        primitive = event.assoc.acceptor.primitive
        if record is not None and primitive is not None:
            record.result = f"rejected: {primitive.reason_str.lower()}"
            logger.warning("rejected an association from %s at %s: %s", record.peer_ae_title, record.peer_address,
                           primitive.reason_str)

    def _on_ended(self, event) -> None:
        record = self._associations.get(event.assoc)
        if record is not None:
            record.ended = "released" if event.event is evt.EVT_RELEASED else "aborted"

    def _on_closed(self, event) -> None:
        """EVT_CONN_CLOSE: the association is over, whatever happened: its audit line."""
        with self._lock:
            record = self._associations.pop(event.assoc, None)
        if record is not None:
            self.audit.write(record.line())

    def tls_refused(self, address: str, reason: str) -> None:
        """A connection whose TLS handshake failed: no association, no AE title; logged and audited."""
        logger.warning("refused a connection from %s: TLS handshake failed (%s)", address, reason)
        self.audit.write({"event": "tls-refused", "peer_address": address, "result": f"rejected: {reason}"})


class Reception:
    """The node's receiving side; ``handlers`` are the pynetdicom event handlers to bind."""

    def __init__(self, incoming: Path, settings: ListenSettings, audit: AuditTrail, tls: bool):
        self.incoming = incoming
        self.settings = settings
        self.gatekeeper = Gatekeeper(settings, audit, tls)
        self._lock = threading.Lock()
        self._series: dict[str, SeriesArrivals] = {}
        self._writing: set[Path] = set()
        self.queued = 0
        self.queued_bytes = 0

    @property
    def handlers(self) -> list[tuple]:
        return [*self.gatekeeper.handlers, (evt.EVT_C_STORE, self._on_store)]

    def recover(self) -> None:
        """Count what a previous run left in ``incoming`` (complete ``idle_seconds`` from now)."""
        now = time.monotonic()
        self.incoming.mkdir(parents=True, exist_ok=True)
        for folder in sorted(p for p in self.incoming.iterdir() if p.is_dir()):
            for partial in folder.glob("*.part"):  # never acknowledged: the sender was told it failed
                partial.unlink()
            files = list(folder.glob("*.dcm"))
            if files:
                size = sum(f.stat().st_size for f in files)
                self._series[folder.name] = SeriesArrivals(len(files), size, last_arrival=now,
                                                           associations=set(associations_of(folder)))
                self.queued += len(files)
                self.queued_bytes += size
            else:
                shutil.rmtree(folder, ignore_errors=True)

    # -- instances ------------------------------------------------------------------------------

    def _limit_reached(self, record: AssociationRecord, size: int, new: bool) -> tuple[str, str] | None:
        """The limit this instance would break (its configuration key, and in words); None when it fits.
        Called under the lock."""
        s = self.settings
        if record.instances >= s.max_instances_per_association:
            return "max_instances_per_association", f"the association already stored {record.instances} instances"
        if record.bytes + size > s.max_bytes_per_association:
            return "max_bytes_per_association", f"the association already stored {record.bytes} bytes"
        if new and self.queued >= s.queue_size:
            return "queue_size", f"queue full ({self.queued} instances waiting)"
        if self.queued_bytes + size > s.max_incoming_bytes:
            return "max_incoming_bytes", f"{self.queued_bytes} bytes already wait in {self.incoming}"
        free = shutil.disk_usage(self.incoming).free
        if free - size < s.min_free_disk_bytes:
            return "min_free_disk_bytes", f"{free} bytes free on the disk of {self.incoming}"
        return None

    def _refuse(self, record: AssociationRecord, status: int, cause: str, words: str, kind: str = "an instance") -> int:
        """Count the refusal for the audit line (``cause``: a fixed phrase or a configuration key) and log it."""
        record.refused[f"0x{status:04X} {cause}"] += 1
        logger.warning("refused %s from %s: %s (0x%04X)", kind, record.peer_ae_title, words, status)
        return status

    def _on_store(self, event) -> int:
        """EVT_C_STORE: check, keep the limits, write durably, then acknowledge; a status for every outcome."""
        record = self.gatekeeper.record(event.assoc)
        try:
            ds = event.dataset
            problem = dataset_problem(ds)
        except Exception as err:  # pydicom parses lazily: any error here means the bytes are not a dataset
            return self._refuse(record, CANNOT_UNDERSTAND, "cannot be parsed", f"it cannot be parsed ({type(err).__name__})")
        if problem:
            kind = UID(str(ds.get("SOPClassUID", ""))).name or "unknown SOP class"
            return self._refuse(record, DOES_NOT_MATCH_SOP_CLASS, problem, problem, f"a {kind} instance")
        data = event.encoded_dataset()
        size = len(data)
        key = series_folder_name(str(ds.SeriesInstanceUID))
        path = self.incoming / key / instance_file_name(str(ds.SOPInstanceUID))
        with self._lock:
            new = not path.exists() and path not in self._writing  # the same instance again replaces its file
            limit = self._limit_reached(record, size, new)
            if limit:
                return self._refuse(record, OUT_OF_RESOURCES, *limit)
            series = self._series.setdefault(key, SeriesArrivals())
            growth = size if new or not path.exists() else size - path.stat().st_size
            self.queued += int(new)
            self.queued_bytes += growth
            series.writing += 1
            self._writing.add(path)
            first_from_here = record.association not in series.associations
            series.associations.add(record.association)
        try:
            if first_from_here:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path.parent / ASSOCIATIONS_FILE, "a") as f:
                    f.write(record.association + "\n")
            write_durably(path, data)
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
                series.bytes += growth
                record.stored(str(ds.SOPClassUID), size)
            else:
                self.queued -= int(new)
                self.queued_bytes -= growth
                record.refused["0xA700 write failed"] += 1
        return SUCCESS if written else OUT_OF_RESOURCES

    def claim_complete_series(self, destination: Path) -> tuple[Path, list[str]] | None:
        """Move one complete series (no instance for ``idle_seconds``) to ``destination`` (a rename);
        the folder and the associations it came from, or None when no series is complete."""
        with self._lock:
            now = time.monotonic()
            for key, series in self._series.items():
                if series.writing or now - series.last_arrival < self.settings.idle_seconds:
                    continue
                del self._series[key]
                self.queued -= series.count
                self.queued_bytes -= series.bytes
                if not series.count:
                    return None
                destination.parent.mkdir(parents=True, exist_ok=True)
                (self.incoming / key).rename(destination)  # incoming_dir and work_dir must be on one file system
                logger.info("series complete: %d instance(s) -> job %s", series.count, destination.name)
                return destination, sorted(series.associations)
        return None

