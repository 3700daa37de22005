"""What the DIMSE and DICOMweb clients share: errors that name the endpoint, per-instance store
outcomes, the retriever and sender interfaces, and quiet network-library loggers."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, TypeVar

from bundle.files import write_durably  # noqa: F401 (the node and the DIMSE client write received instances with it)
from bundle.pacs.config import RetryPolicy

logger = logging.getLogger(__name__)
T = TypeVar("T")


class PacsError(RuntimeError):
    """A PACS could not be used. The message names the endpoint (``AE@host:port`` or the URL) and
    never a credential. ``retryable`` is False where trying again cannot help (a rejected AE title,
    refused credentials, an untrusted certificate, a study that is not there)."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class StoreOutcome:
    """What the destination answered for one instance: ``stored`` or not, and its status in words."""

    stored: bool
    status: str


class Retriever(Protocol):
    description: str

    def retrieve(self, study_uid: str, series_uid: str | None, folder: Path) -> int:
        """Write the study's (or series') instances into ``folder``; return how many arrived."""


class Sender(Protocol):
    description: str

    def store(self, paths: list[Path]) -> dict[Path, StoreOutcome]:
        """Send DICOM files; an outcome per file. Raises PacsError when nothing could be sent."""


def with_retries(policy: RetryPolicy, action: Callable[[], T], what: str) -> T:
    """Run ``action``; on a retryable PacsError wait with exponential backoff and try again,
    ``policy.attempts`` times in all. The last error is raised."""
    for attempt in range(policy.attempts):
        try:
            return action()
        except PacsError as err:
            if not err.retryable or attempt == policy.attempts - 1:
                raise
            pause = policy.delay(attempt)
            logger.warning("%s failed (attempt %d of %d): %s; retrying in %.1f s", what, attempt + 1, policy.attempts,
                           err, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def instance_file_name(sop_instance_uid: str) -> str:
    """A file name for a received instance that does not spell out its UID (folder listings and the
    inference's own file names derive from it), and is the same when the instance comes again."""
    import hashlib

    return hashlib.sha256(sop_instance_uid.encode()).hexdigest()[:24] + ".dcm"


def quiet_network_loggers() -> None:
    """pynetdicom logs query identifiers (UIDs) at INFO, dicomweb-client the UID of every failed
    instance at ERROR and urllib3 request paths (with UIDs) at DEBUG: none may reach our logs,
    which carry no patient data or UIDs. Our own messages say what failed, by endpoint and count."""
    from pynetdicom import _config as pynetdicom_config

    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    logging.getLogger("dicomweb_client").setLevel(logging.CRITICAL)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its debug and retry lines carry request paths (UIDs)
