"""The on-demand path and what the node shares with it: retrieve -> infer -> outbox -> deliver.

``run_study`` retrieves a study (or one series) into ``work_dir/<job id>/``, ``infer_and_deliver``
runs the bundle's inference over such a folder into ``outbox_dir/<job id>/results`` and sends the
DICOM results to the destination, and ``resend`` delivers what is still pending in the outbox.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from bundle.pacs.config import PacsConfig
from bundle.pacs.dicomweb import DicomWebService
from bundle.pacs.dimse import DimseClient
from bundle.pacs.outbox import DeliveryReport, Job, JobBusy, deliver, jobs_in, new_job_id, report
from bundle.pacs.protocol import PacsError, Retriever, Sender, quiet_network_loggers, with_retries
from bundle.pacs.runner import InferenceFailed, InferenceRunner, InferenceStopped

logger = logging.getLogger(__name__)


def retriever_for(config: PacsConfig, endpoint_name: str, protocol: str) -> Retriever:
    endpoint = config.endpoint(endpoint_name)
    if protocol == "wado-rs":
        return DicomWebService(endpoint)
    return DimseClient(endpoint, config.ae_title, retrieve_with=protocol, receive_port=config.port,
                       bind_address=config.bind_address, tls=config.tls)


def sender_for(config: PacsConfig, endpoint_name: str, protocol: str) -> Sender:
    endpoint = config.endpoint(endpoint_name)
    if protocol == "stow-rs":
        return DicomWebService(endpoint, batch_size=config.stow_batch_size)
    return DimseClient(endpoint, config.ae_title, tls=config.tls)


def echo(config: PacsConfig, endpoint_name: str) -> list[tuple[str, str | None]]:
    """C-ECHO and a QIDO-RS search against an endpoint, for each side it has: (what, error or None)."""
    quiet_network_loggers()
    endpoint = config.endpoint(endpoint_name)
    checks = []
    if endpoint.ae_title and endpoint.host and endpoint.port:
        checks.append(("C-ECHO", DimseClient(endpoint, config.ae_title, tls=config.tls)))
    if endpoint.dicomweb_url:
        checks.append(("QIDO-RS", DicomWebService(endpoint)))
    results = []
    for what, client in checks:
        try:
            client.echo()
            results.append((f"{what} {client.description}", None))
        except PacsError as err:
            results.append((f"{what} {client.description}", str(err)))
    return results


def infer_and_deliver(config: PacsConfig, job_id: str, inputs: Path, origin: str, destination: str, send_with: str,
                      runner: InferenceRunner | None = None) -> DeliveryReport:
    """Run inference over ``inputs`` into the job's outbox folder, record the job, drop the inputs,
    and deliver. An inference failure is recorded in the job and raised; its inputs are kept."""
    folder = config.outbox_dir / job_id
    runner = runner or InferenceRunner(config.inference, config.secret_environment_variables)
    try:
        outcome = runner.run(inputs, folder / "results", folder / "inference.log")
    except InferenceStopped:
        raise  # nothing recorded: the inputs stay and the job runs again
    except InferenceFailed as err:
        Job.failed(folder, origin, destination, send_with, str(err))
        raise
    job = Job.from_results(folder, origin, destination, send_with, outcome, folder / "results")
    shutil.rmtree(inputs, ignore_errors=True)  # the results and job.json are on disk: the sources are no longer needed
    logger.info("job %s: %d input(s) processed, %d failed, %d result instance(s) to send to %s", job_id,
                outcome.processed, outcome.failed, len(job.files), destination)
    return deliver(job, sender_for(config, destination, send_with), config.retry)


def run_study(config: PacsConfig, study_uid: str, series_uid: str | None = None) -> DeliveryReport:
    """On demand: retrieve a study (or one of its series), run inference, send the results back."""
    quiet_network_loggers()
    run = config.run
    job_id = new_job_id()
    work = config.work_dir / "run" / job_id
    retriever = retriever_for(config, run.source, run.retrieve_with)
    try:
        count = with_retries(config.retry, lambda: retriever.retrieve(study_uid, series_uid, work),
                             f"retrieval ({run.retrieve_with}) from {retriever.description}")
    except PacsError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.info("job %s: %d instance(s) retrieved from %s", job_id, count, retriever.description)
    return infer_and_deliver(config, job_id, work, "run", run.destination, run.send_with)


def resend(config: PacsConfig, job_ids: list[str] | None = None, again: bool = False,
           destination: str | None = None, send_with: str | None = None) -> list[DeliveryReport]:
    """Deliver what is pending in the outbox (every file of the named jobs with ``again``), each job to
    its own destination unless ``destination`` / ``send_with`` say otherwise."""
    quiet_network_loggers()
    reports = []
    for job in jobs_in(config.outbox_dir):
        if job_ids and job.job_id not in job_ids:
            continue
        if job.stage != "inferred" or not (job.pending() or again):
            continue
        sender = sender_for(config, destination or job.destination, send_with or job.send_with)
        try:
            reports.append(deliver(job, sender, config.retry, again=again))
        except JobBusy as busy:
            reports.append(report(job, sender.description, str(busy)))
    return reports
