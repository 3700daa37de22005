"""The node's audit trail: ``work_dir/audit.log``, one JSON object per line.

- ``"event": "association"``: one line per association when it ends, accepted or not: the peer's AE
  title and address, whether it spoke TLS, ``"accepted"`` or ``"rejected: <why>"``, the instances
  and bytes it stored, their SOP classes (by name), what was refused and why, how it ended;
- ``"event": "tls-refused"``: a connection whose TLS handshake failed (no AE title is known then);
- ``"event": "forwarded"``: a job's results sent on, naming the associations whose instances it
  was made from: results stored by kind, pending, destination; ``"event": "job-failed"`` likewise.

Results are forwarded after a series is complete and inferred, minutes after its associations
ended, so they get lines of their own that point back at the associations' ``association`` ids.
No line holds patient data or a UID: SOP classes by name, counts, AE titles, addresses, job ids.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import UID

AUDIT_FILE = "audit.log"


def new_association_id() -> str:
    """A time-ordered association name for the trail and the series it contributed to."""
    return "a" + time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


@dataclass
class AssociationRecord:
    """What one association did, kept while it lasts."""

    peer_ae_title: str
    peer_address: str
    tls: bool
    association: str = field(default_factory=new_association_id)
    started: float = field(default_factory=time.time)
    result: str = "accepted"
    instances: int = 0
    bytes: int = 0
    sop_classes: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)
    ended: str = "closed"

    def stored(self, sop_class_uid: str, size: int) -> None:
        self.instances += 1
        self.bytes += size
        self.sop_classes[UID(sop_class_uid).name or "unknown SOP class"] += 1

    def line(self) -> dict:
        return {"event": "association", "association": self.association, "peer_ae_title": self.peer_ae_title,
                "peer_address": self.peer_address, "tls": self.tls, "result": self.result, "instances": self.instances,
                "bytes": self.bytes, "sop_classes": dict(sorted(self.sop_classes.items())),
                "refused": dict(sorted(self.refused.items())), "ended": self.ended,
                "seconds": round(time.time() - self.started, 3)}


class AuditTrail:
    """Appends lines to ``folder/audit.log``, each flushed to disk before ``write`` returns."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / AUDIT_FILE
        self._lock = threading.Lock()

    def write(self, line: dict) -> None:
        text = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **line}, sort_keys=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())

    def lines(self) -> list[dict]:
        """Every line so far (for people and tests)."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
