"""The PACS configuration (``configs/pacs.json``): endpoints, folders, retry policy, listener and model.

The node is closed by default: it listens on loopback unless ``local.bind_address`` names an
interface, only the peers of ``listen.accept_from`` (an AE title *and* the host or network it calls
from) may associate, and ``local.tls`` gives the certificate, key and CA for DICOM TLS.

The file holds no secret. DICOMweb credentials come from two environment variables named in the
endpoint's entry, or from a JSON credentials file that must lie outside the repository; they are
read when a session is opened and kept out of every ``repr``, log line, job file and report.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

REPOSITORY = Path(__file__).resolve().parents[2]
RETRIEVE_PROTOCOLS = ("wado-rs", "c-get", "c-move")
SEND_PROTOCOLS = ("stow-rs", "c-store")


class PacsConfigError(ValueError):
    """The PACS configuration or the credentials are unusable; the message names the entry."""


@dataclass(frozen=True)
class Credentials:
    """HTTP Basic credentials for a DICOMweb service. The password never appears in ``repr``."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Endpoint:
    """A PACS (or any DICOM node) reachable over DIMSE, DICOMweb or both.

    ``username_env`` / ``password_env`` name environment variables; ``credentials_file`` is a JSON
    file ``{"username": ..., "password": ...}`` outside the repository. Environment variables win.
    ``ca_bundle`` is a PEM file of CAs to trust for https (certificates are always verified).
    ``dicom_tls``: every DIMSE association with this peer uses DICOM TLS with ``local.tls``.
    """

    name: str
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    dicomweb_url: str | None = None
    ca_bundle: str | None = None
    username_env: str | None = None
    password_env: str | None = None
    credentials_file: str | None = None
    timeout_seconds: float = 30.0
    dicom_tls: bool = False

    @property
    def dimse_address(self) -> str:
        """``AE@host:port``: how errors and reports name the DIMSE side of this endpoint."""
        return f"{self.ae_title}@{self.host}:{self.port}"

    def require_dimse(self) -> None:
        if not (self.ae_title and self.host and self.port):
            raise PacsConfigError(f"endpoint {self.name!r} needs ae_title, host and port for DIMSE")

    def require_dicomweb(self) -> None:
        if not self.dicomweb_url:
            raise PacsConfigError(f"endpoint {self.name!r} needs dicomweb_url for DICOMweb")

    def credentials(self) -> Credentials | None:
        """The DICOMweb credentials (environment first, then the credentials file), or None for none."""
        user = os.environ.get(self.username_env or "") if self.username_env else None
        password = os.environ.get(self.password_env or "") if self.password_env else None
        if user and password is not None:
            return Credentials(user, password)
        if not self.credentials_file:
            return None
        path = Path(self.credentials_file).expanduser()
        if not path.is_file():
            return None
        path = path.resolve()
        if path.is_relative_to(REPOSITORY):
            raise PacsConfigError(f"endpoint {self.name!r}: the credentials file {path} lies inside the repository; "
                                  "keep it outside (for instance in ~/.config) so that it is never committed")
        try:
            stored = json.loads(path.read_text())
            return Credentials(str(stored["username"]), str(stored["password"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            # the message names the file and the problem, never its content
            raise PacsConfigError(f"endpoint {self.name!r}: credentials file {path} must be JSON with "
                                  f"'username' and 'password' ({type(err).__name__})") from None

    @property
    def secret_environment_variables(self) -> tuple[str, ...]:
        return tuple(v for v in (self.username_env, self.password_env) if v)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; the pause after try k (from 0) is ``first_delay * factor**k``, capped."""

    attempts: int = 5
    first_delay_seconds: float = 2.0
    factor: float = 2.0
    max_delay_seconds: float = 60.0

    def delay(self, attempt: int) -> float:
        return min(self.first_delay_seconds * self.factor**attempt, self.max_delay_seconds)


@dataclass(frozen=True)
class RunSettings:
    """The on-demand command: where studies come from and where results go, and by which protocol."""

    source: str = "pacs"
    retrieve_with: str = "wado-rs"
    destination: str = "pacs"
    send_with: str = "stow-rs"


@dataclass(frozen=True)
class AcceptRule:
    """A peer allowed to associate with the node: its calling AE title and the host it calls from,
    an IP address, a network in CIDR notation (``10.20.0.0/24``) or a host name (resolved when the
    node starts)."""

    ae_title: str
    host: str

    def __str__(self) -> str:
        return f"{self.ae_title} from {self.host}"


@dataclass(frozen=True)
class TlsSettings:
    """DICOM TLS: our ``certificate`` and ``private_key`` (PEM), and ``ca_certificates``, the PEM file
    of the CAs a peer's certificate must chain to. The listener asks every caller for a certificate
    and refuses one without a valid one when ``require_peer_certificate`` (else it checks a
    certificate shown, and accepts a caller that shows none). As a client we always verify the peer's
    certificate and its address (the endpoint's ``host`` must be in it)."""

    certificate: str
    private_key: str
    ca_certificates: str
    require_peer_certificate: bool = True


@dataclass(frozen=True)
class ListenSettings:
    """The DICOM node: results go to ``destination`` by ``send_with``; a series is complete after
    ``idle_seconds`` without a new instance; at most ``queue_size`` instances wait on disk; undelivered
    results are retried every ``resend_every_seconds``."""

    destination: str = "pacs"
    send_with: str = "c-store"
    idle_seconds: float = 30.0
    queue_size: int = 5000
    resend_every_seconds: float = 300.0
    accept_from: tuple[AcceptRule, ...] = ()
    tls: bool = False
    max_instances_per_association: int = 10000
    max_bytes_per_association: int = 20 * 1024**3
    max_incoming_bytes: int = 100 * 1024**3
    min_free_disk_bytes: int = 5 * 1024**3


@dataclass(frozen=True)
class InferenceSettings:
    """How the bundle's inference config is run: the checkpoint and the model overrides of training."""

    ckpt_path: str
    config_file: str = "configs/inference.json"
    meta_file: str = "configs/metadata.json"
    logging_file: str = "configs/logging.conf"
    overrides: dict = field(default_factory=dict)
    tracking_uri: str | None = None


@dataclass(frozen=True)
class PacsConfig:
    """Everything ``scripts/pacs.py`` needs; relative folders are taken from the working directory."""

    ae_title: str
    port: int
    endpoints: dict[str, Endpoint]
    inference: InferenceSettings
    bind_address: str = "127.0.0.1"
    tls: TlsSettings | None = None
    run: RunSettings = RunSettings()
    listen: ListenSettings = ListenSettings()
    retry: RetryPolicy = RetryPolicy()
    incoming_dir: Path = Path("pacs/incoming")
    work_dir: Path = Path("pacs/work")
    outbox_dir: Path = Path("pacs/outbox")
    stow_batch_size: int = 20

    def endpoint(self, name: str) -> Endpoint:
        if name not in self.endpoints:
            raise PacsConfigError(f"no endpoint {name!r} in the configuration (known: {', '.join(self.endpoints)})")
        return self.endpoints[name]

    @property
    def secret_environment_variables(self) -> tuple[str, ...]:
        """Every credential variable the endpoints name: kept out of the inference's environment."""
        return tuple(v for e in self.endpoints.values() for v in e.secret_environment_variables)


def _endpoint(name: str, entry: dict) -> Endpoint:
    unknown = set(entry) - set(Endpoint.__dataclass_fields__) - {"name"}
    if unknown:
        raise PacsConfigError(f"endpoint {name!r}: unknown keys {sorted(unknown)} (secrets never go in this file; "
                              "name environment variables with username_env/password_env)")
    endpoint = Endpoint(name=name, **entry)
    if endpoint.dicomweb_url:
        parts = urlsplit(endpoint.dicomweb_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsConfigError(f"endpoint {name!r}: dicomweb_url must be an http(s) URL")
        if parts.username or parts.password:
            raise PacsConfigError(f"endpoint {name!r}: dicomweb_url must not hold credentials; "
                                  "use username_env/password_env or credentials_file")
    return endpoint


def _check_protocols(where: str, settings, names: dict[str, tuple[str, ...]], endpoints: dict[str, Endpoint]) -> None:
    for key, allowed in names.items():
        if getattr(settings, key) not in allowed:
            raise PacsConfigError(f"{where}.{key} must be one of {', '.join(allowed)}, not {getattr(settings, key)!r}")
    for key in ("source", "destination"):
        if hasattr(settings, key) and getattr(settings, key) not in endpoints:
            raise PacsConfigError(f"{where}.{key}: no endpoint {getattr(settings, key)!r} in endpoints")


def _accept_rule(index: int, entry) -> AcceptRule:
    example = '{"ae_title": "CT_SCANNER", "host": "10.20.0.0/24"}'
    if not isinstance(entry, dict) or set(entry) != {"ae_title", "host"}:
        raise PacsConfigError(f"listen.accept_from[{index}] must name a calling AE title and the host or network it "
                              f"calls from, as in {example}, not {entry!r}")
    rule = AcceptRule(str(entry["ae_title"]).strip(), str(entry["host"]).strip())
    if not rule.ae_title or len(rule.ae_title) > 16 or not rule.host or " " in rule.host:
        raise PacsConfigError(f"listen.accept_from[{index}]: an AE title of 1 to 16 characters and an address, a "
                              f"network (CIDR) or a host name, as in {example}, not {entry!r}")
    return rule


def _listen_settings(raw: dict) -> ListenSettings:
    raw = dict(raw)
    raw["accept_from"] = tuple(_accept_rule(i, entry) for i, entry in enumerate(raw.get("accept_from", ())))
    listen = ListenSettings(**raw)
    limits = ("max_instances_per_association", "max_bytes_per_association", "max_incoming_bytes", "queue_size")
    for key in limits:
        if getattr(listen, key) < 1:
            raise PacsConfigError(f"listen.{key} must be at least 1")
    if listen.min_free_disk_bytes < 0:
        raise PacsConfigError("listen.min_free_disk_bytes must not be negative")
    return listen


def load_config(path: str | Path) -> PacsConfig:
    """Read and check ``configs/pacs.json`` (or another file of the same shape)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PacsConfigError(f"cannot read the PACS configuration {path}: {err}") from None
    try:
        local = raw["local"]
        endpoints = {name: _endpoint(name, entry) for name, entry in raw["endpoints"].items()}
        run = RunSettings(**raw.get("run", {}))
        listen = _listen_settings(raw.get("listen", {}))
        config = PacsConfig(
            ae_title=local["ae_title"], port=int(local["port"]), bind_address=local.get("bind_address") or "127.0.0.1",
            tls=TlsSettings(**local["tls"]) if local.get("tls") else None,
            endpoints=endpoints, run=run, listen=listen, retry=RetryPolicy(**raw.get("retry", {})),
            incoming_dir=Path(raw.get("incoming_dir", "pacs/incoming")), work_dir=Path(raw.get("work_dir", "pacs/work")),
            outbox_dir=Path(raw.get("outbox_dir", "pacs/outbox")), stow_batch_size=int(raw.get("stow_batch_size", 20)),
            inference=InferenceSettings(**raw["inference"]),
        )
    except (KeyError, TypeError) as err:
        raise PacsConfigError(f"{path}: missing or unexpected entry ({type(err).__name__}: {err})") from None
    _check_protocols("run", run, {"retrieve_with": RETRIEVE_PROTOCOLS, "send_with": SEND_PROTOCOLS}, endpoints)
    _check_protocols("listen", listen, {"send_with": SEND_PROTOCOLS}, endpoints)
    if len(config.ae_title) > 16 or not config.ae_title.strip():
        raise PacsConfigError(f"local.ae_title must be 1 to 16 characters, not {config.ae_title!r}")
    if config.retry.attempts < 1:
        raise PacsConfigError("retry.attempts must be at least 1")
    wanting_tls = ["listen.tls"] * listen.tls + [f"endpoints.{e.name}.dicom_tls" for e in endpoints.values() if e.dicom_tls]
    if wanting_tls and config.tls is None:
        raise PacsConfigError(f"{', '.join(wanting_tls)} asks for DICOM TLS: give local.tls (certificate, private_key, "
                              "ca_certificates)")
    return config
