"""Talk to a PACS: check it, run inference on a study on demand, act as a DICOM node, resend results.

    python scripts/pacs.py echo                       # C-ECHO and a DICOMweb query to the configured PACS
    python scripts/pacs.py run --study UID [--series UID]
    python scripts/pacs.py listen                     # Store SCP: complete series -> inference -> destination
                                                      # (loopback unless local.bind_address and listen.accept_from say
                                                      # otherwise; DICOM TLS with listen.tls; audit in work_dir)
    python scripts/pacs.py resend [--job ID] [--again]

Endpoints, folders and the model are in ``configs/pacs.json`` (``--config``); credentials only in
environment variables or a file outside the repository (see docs/pacs.md). Exit status: 0 all
results delivered; 1 an error (message on stderr); 2 delivered, but some inputs could not be
processed; 3 some results were not delivered and wait in the outbox.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.pacs.config import RETRIEVE_PROTOCOLS, SEND_PROTOCOLS, PacsConfigError, load_config  # noqa: E402
from bundle.pacs.outbox import DeliveryReport  # noqa: E402
from bundle.pacs.protocol import PacsError  # noqa: E402
from bundle.pacs.runner import InferenceFailed  # noqa: E402

logger = logging.getLogger("pacs")
NOT_DELIVERED, INPUTS_FAILED = 3, 2


def exit_status(reports: list[DeliveryReport]) -> int:
    if any(not r.complete for r in reports):
        return NOT_DELIVERED
    return INPUTS_FAILED if any(r.failed_inputs for r in reports) else 0


def print_reports(reports: list[DeliveryReport], as_json: bool) -> None:
    if as_json:
        print(json.dumps([r.as_dict() for r in reports], indent=1))
        return
    for r in reports:
        print("\n".join(r.lines()))


def command_echo(config, args) -> int:
    from bundle.pacs.pipeline import echo

    names = args.endpoint or sorted({config.run.source, config.run.destination, config.listen.destination})
    status = 0
    for name in names:
        for what, error in echo(config, name):
            print(f"{what}: {'ok' if error is None else 'FAILED: ' + error}")
            status = status or int(error is not None)
    return status


def command_run(config, args) -> int:
    from bundle.pacs.pipeline import run_study

    config = dataclasses.replace(config, run=dataclasses.replace(
        config.run, retrieve_with=args.retrieve_with or config.run.retrieve_with,
        send_with=args.send_with or config.run.send_with))
    report = run_study(config, args.study, args.series)
    print_reports([report], args.json)
    return exit_status([report])


def command_resend(config, args) -> int:
    from bundle.pacs.pipeline import resend

    reports = resend(config, args.job, again=args.again, destination=args.to, send_with=args.send_with)
    if args.job and len(reports) < len(args.job):
        logger.warning("%d of the named job(s) had nothing to send or are not in %s", len(args.job) - len(reports),
                       config.outbox_dir)
    if not reports:
        print(f"nothing to send in {config.outbox_dir}")
    print_reports(reports, args.json)
    return exit_status(reports)


def command_listen(config, args) -> int:
    from bundle.pacs.node import StorageNode

    node = StorageNode(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        node.start()
    except OSError as err:
        raise PacsError(f"cannot listen on {config.bind_address}:{config.port}: {err.strerror}", retryable=False) from None
    stop.wait()
    node.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/pacs.json"), help="the PACS configuration")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging (still without patient data)")
    commands = parser.add_subparsers(dest="command", required=True)
    echo = commands.add_parser("echo", help="C-ECHO and DICOMweb QIDO-RS against configured endpoints")
    echo.add_argument("--endpoint", action="append", help="endpoint name (default: those the config uses)")
    run = commands.add_parser("run", help="retrieve a study, run inference, send the results back")
    run.add_argument("--study", required=True, help="StudyInstanceUID")
    run.add_argument("--series", help="SeriesInstanceUID: only this series of the study")
    run.add_argument("--retrieve-with", choices=RETRIEVE_PROTOCOLS, help="override run.retrieve_with")
    run.add_argument("--send-with", choices=SEND_PROTOCOLS, help="override run.send_with")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    commands.add_parser("listen", help="act as a DICOM node (Store SCP) until SIGTERM / Ctrl-C")
    resend = commands.add_parser("resend", help="deliver the results still pending in the outbox")
    resend.add_argument("--job", action="append", help="only this job (repeatable)")
    resend.add_argument("--again", action="store_true", help="send every result of the jobs, delivered or not")
    resend.add_argument("--to", help="another endpoint name to send to")
    resend.add_argument("--send-with", choices=SEND_PROTOCOLS, help="another protocol to send with")
    resend.add_argument("--json", action="store_true", help="print the reports as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = {"echo": command_echo, "run": command_run, "listen": command_listen, "resend": command_resend}
    try:
        return handlers[args.command](load_config(args.config), args)
    except (PacsConfigError, PacsError, InferenceFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
