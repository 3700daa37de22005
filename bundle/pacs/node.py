"""A DICOM node: a Store SCP that receives images, groups them by series, runs inference on every
series that is complete (no new instance for ``idle_seconds``) and forwards the results.

Nothing acknowledged is lost: an instance is written to ``incoming_dir/<series>/`` and flushed to
disk before the success status goes back. A complete series moves (one rename) to
``work_dir/listen/<job id>/`` and becomes a job; a restarted node finds unfinished series in
``incoming_dir``, unfinished jobs in ``work_dir/listen`` and undelivered results in the outbox, and
carries on. Who may call, the limits (refusals with 0xA700, Out of Resources, before anything is
written) and the audit line per association are ``reception``'s; the node adds a ``forwarded``
audit line per job. A dataset that cannot be parsed (0xC210) or has no pixel data or UIDs (0xA900)
is refused and logged by what was wrong and who sent it, never by patient data or UIDs.

The node listens on loopback unless ``local.bind_address`` names an interface, refuses to listen
on the network without ``listen.accept_from`` and speaks DICOM TLS only with ``listen.tls``.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from pydicom.pixels.decoders.base import get_decoder
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from bundle.pacs.audit import AuditTrail
from bundle.pacs.config import PacsConfig, PacsConfigError
from bundle.pacs.outbox import DeliveryReport, Job, JobBusy, deliver, jobs_in, new_job_id
from bundle.pacs.pipeline import infer_and_deliver, sender_for
from bundle.pacs.protocol import PacsError, quiet_network_loggers
from bundle.pacs.reception import Reception, associations_of
from bundle.pacs.runner import InferenceFailed, InferenceRunner, InferenceStopped
from bundle.pacs.security import check_exposure, is_loopback, server_context

logger = logging.getLogger(__name__)


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


class StorageNode:
    """The listener of ``scripts/pacs.py listen``: ``start`` returns once it is listening; ``stop``."""

    def __init__(self, config: PacsConfig, poll_seconds: float = 0.2):
        self.config = config
        self.settings = config.listen
        self.work = config.work_dir / "listen"
        self.poll_seconds = poll_seconds
        self.audit = AuditTrail(config.work_dir)
        self.runner = InferenceRunner(config.inference, config.secret_environment_variables)
        self.sender = sender_for(config, self.settings.destination, self.settings.send_with)
        self.reception: Reception | None = None
        self._recovered: list[tuple[Path, list[str]]] = []
        self._stop = threading.Event()
        self._server = None
        self._worker: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Check the exposure, pick up what a previous run left, listen. Raises PacsConfigError for
        a node that would be open to the network, OSError when the port cannot be bound."""
        check_exposure(self.config)
        quiet_network_loggers()
        reception = self.reception = Reception(self.config.incoming_dir, self.settings, self.audit, self.settings.tls)
        reception.recover()
        self._recover_jobs()
        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True
        syntaxes = decodable_transfer_syntaxes()
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        context = server_context(self.config.tls, reception.gatekeeper.tls_refused) if self.settings.tls else None
        self._server = ae.start_server((self.config.bind_address, self.config.port), block=False,
                                       ssl_context=context, evt_handlers=reception.handlers)
        self._worker = threading.Thread(target=self._work, name="pacs-node-worker", daemon=True)
        self._worker.start()
        who = ", ".join(map(str, self.settings.accept_from)) or "anyone on this machine"
        logger.info("listening as %s on %s:%d%s, accepting %s; a series is complete after %.1f s without a new "
                    "instance; results go to %s; %d instance(s) and %d job(s) carried over; audit trail %s",
                    self.config.ae_title, self.config.bind_address, self.config.port,
                    " (DICOM TLS)" if context else "", who, self.settings.idle_seconds, self.sender.description,
                    reception.queued, len(self._recovered), self.audit.path)
        if context is None and not is_loopback(self.config.bind_address):
            logger.warning("listening on %s without DICOM TLS: images cross the network unencrypted and callers are "
                           "known by AE title and address only; set listen.tls with local.tls", self.config.bind_address)

    def stop(self) -> None:
        """Stop listening, end a running inference (its job runs again after a restart), wait for the worker."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        self.runner.stop()
        if self._worker is not None:
            self._worker.join()
        waiting = self.reception.queued if self.reception else 0
        logger.info("stopped; %d instance(s) wait in %s", waiting, self.config.incoming_dir)

    def _recover_jobs(self) -> None:
        """Pick up the jobs a previous run left in ``work``."""
        if not self.work.is_dir():
            return
        for folder in sorted(self.work.iterdir()):
            job_file = self.config.outbox_dir / folder.name / "job.json"
            if not job_file.is_file():
                self._recovered.append((folder, associations_of(folder)))  # received, never inferred (or stopped)
            elif Job.load(job_file.parent).stage == "inferred":
                shutil.rmtree(folder, ignore_errors=True)  # inferred before the stop: only the clean-up was left
            # else the inference failed: the inputs stay for someone to look at

    # -- processing -----------------------------------------------------------------------------

    def _work(self) -> None:
        next_resend = time.monotonic()  # undelivered results of earlier runs first
        while not self._stop.is_set():
            claimed = self._recovered.pop(0) if self._recovered else \
                self.reception.claim_complete_series(self.work / new_job_id())
            if claimed is not None:
                self._process(*claimed)
                continue
            if time.monotonic() >= next_resend:
                self._resend_pending()
                next_resend = time.monotonic() + self.settings.resend_every_seconds
            self._stop.wait(self.poll_seconds)

    def _process(self, work: Path, associations: list[str]) -> None:
        try:
            result = infer_and_deliver(self.config, work.name, work, "listen", self.settings.destination,
                                       self.settings.send_with, runner=self.runner)
        except InferenceStopped:
            return
        except (InferenceFailed, PacsError, OSError) as err:  # messages name endpoints and logs, never UIDs
            logger.error("job %s failed: %s", work.name, err)
            self._audit_job(work.name, associations, error=type(err).__name__)
            return
        except Exception as err:  # the node goes on; the message could hold a result's file name (a UID): not logged
            logger.error("job %s failed (%s); a restart runs it again if its inputs are still in %s", work.name,
                         type(err).__name__, work.parent)
            self._audit_job(work.name, associations, error=type(err).__name__)
            return
        for line in result.lines():
            logger.info("%s", line)
        self._audit_job(work.name, associations, result)

    def _audit_job(self, job_id: str, associations: list[str], result: DeliveryReport | None = None,
                   error: str = "") -> None:
        """The audit line of a job: the associations it came from and what was forwarded where."""
        if result is None:
            self.audit.write({"event": "job-failed", "job": job_id, "associations": associations, "error": error})
            return
        self.audit.write({"event": "forwarded", "job": job_id, "associations": associations,
                          "destination": result.destination, "inputs": result.processed,
                          "failed_inputs": result.failed_inputs, "stored": result.stored, "pending": result.pending})

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
            self._audit_job(job.job_id, [], result)  # a later delivery: its associations are in the job's first line
