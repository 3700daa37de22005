"""Who may talk to the node, and DICOM TLS for it and for every DIMSE association we open.

- ``check_exposure``: the node listens on loopback unless told otherwise, and never on a network
  interface without an accept list;
- ``AccessPolicy``: ``listen.accept_from`` as a check of the calling AE title *and* the address
  the association comes from (AE titles are no credential on their own);
- ``server_context`` / ``client_context``: ``ssl.SSLContext`` objects for pynetdicom's TLS support
  (``start_server(ssl_context=...)``, ``associate(tls_args=...)``) from ``local.tls``;
- ``tls_failure``: what went wrong in a TLS handshake with a peer, in words.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from pathlib import Path
from typing import Callable

from bundle.pacs.config import AcceptRule, PacsConfig, PacsConfigError, TlsSettings

logger = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
HANDSHAKE_SECONDS = 10.0


def is_loopback(bind_address: str) -> bool:
    """Whether a bind address reaches this machine only ("localhost", 127.0.0.0/8, ::1)."""
    if bind_address == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind_address).is_loopback
    except ValueError:
        return False


def check_exposure(config: PacsConfig) -> None:
    """Refuse to open the node to the network without an accept list: anyone who can reach the port
    could store images and have results forwarded into the PACS."""
    if is_loopback(config.bind_address) or config.listen.accept_from:
        return
    where = "all interfaces" if config.bind_address in ("", "0.0.0.0", "::") else f"the interface {config.bind_address}"
    raise PacsConfigError(
        f"refusing to listen on {where} (local.bind_address {config.bind_address!r}, port {config.port}) with an empty "
        "listen.accept_from: anyone who reaches the port could store images into the node. Name the peers that may "
        'call in listen.accept_from, e.g. [{"ae_title": "CT_SCANNER", "host": "10.20.0.0/24"}], or listen on '
        'loopback only (local.bind_address "127.0.0.1")')


def _networks(rule: AcceptRule) -> list[IPNetwork]:
    try:
        return [ipaddress.ip_network(rule.host, strict=False)]
    except ValueError:
        pass
    try:  # a host name: its addresses now (the node resolves once, when it starts)
        infos = socket.getaddrinfo(rule.host, None, proto=socket.IPPROTO_TCP)
    except OSError as err:
        raise PacsConfigError(f"listen.accept_from: cannot resolve the host {rule.host!r} of {rule} ({err})") from None
    return [ipaddress.ip_network(info[4][0]) for info in infos]


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped  # an IPv4 peer of a node bound to "::"
    return address


class AccessPolicy:
    """``listen.accept_from``: a peer may associate only with an AE title named there, from the
    host or network named with it. Without rules (a loopback node) every caller is accepted."""

    def __init__(self, rules: tuple[AcceptRule, ...]):
        self.rules = [(rule.ae_title, _networks(rule)) for rule in rules]

    def refusal(self, calling_ae: str, address: str) -> str | None:
        """Why the association must be rejected, in words; None to accept it."""
        if not self.rules:
            return None
        calling_ae = calling_ae.strip()
        networks = [net for ae_title, nets in self.rules if ae_title == calling_ae for net in nets]
        if not networks:
            return "calling AE title not in listen.accept_from"
        peer = _address(address)
        if peer is None or not any(peer.version == net.version and peer in net for net in networks):
            return "calling AE title not accepted from this address"
        return None


def reject(assoc) -> None:
    """Answer an association request with A-ASSOCIATE-RJ (rejected permanent, calling AE title not
    recognised) from an ``EVT_REQUESTED`` handler, before any data is exchanged. Ending the
    association as pynetdicom's own negotiation does (``kill`` waits until the rejection went out)
    keeps the rejection from being lost to a connection reset."""
    assoc.acse.send_reject(0x01, 0x01, 0x03)
    assoc.kill()


def _readable(path: str, what: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise PacsConfigError(f"local.tls.{what}: no file {file}")
    return str(file)


def _load(context: ssl.SSLContext, tls: TlsSettings) -> None:
    try:
        context.load_cert_chain(_readable(tls.certificate, "certificate"), _readable(tls.private_key, "private_key"))
        context.load_verify_locations(cafile=_readable(tls.ca_certificates, "ca_certificates"))
    except ssl.SSLError as err:
        raise PacsConfigError(f"local.tls: cannot use {tls.certificate}, {tls.private_key} or {tls.ca_certificates}: "
                              f"{err.reason or err}") from None


class ServerContext(ssl.SSLContext):
    """The listener's TLS context. pynetdicom does the TLS handshake of a new connection in its
    accept loop (``AssociationServer.get_request``), on a blocking socket and without a word when it
    fails; this context bounds the handshake in time (a caller that sends nothing must not stall
    every other one) and reports a failed handshake with the peer's address to ``on_failure``."""

    on_failure: Callable[[str, str], None] | None = None

    def wrap_socket(self, sock, server_side=False, *args, **kwargs):
        if not server_side:
            return super().wrap_socket(sock, server_side, *args, **kwargs)
        try:
            peer = sock.getpeername()[0]
        except OSError:
            peer = "unknown address"
        sock.settimeout(HANDSHAKE_SECONDS)
        try:
            wrapped = super().wrap_socket(sock, server_side, *args, **kwargs)
        except OSError as err:
            if self.on_failure is not None:
                self.on_failure(peer, handshake_words(err))
            raise
        wrapped.settimeout(None)
        return wrapped


def server_context(tls: TlsSettings, on_failure: Callable[[str, str], None] | None = None) -> ServerContext:
    """For the listener (and the C-MOVE receiver): our certificate; callers' certificates must chain
    to ``ca_certificates`` (required, or checked when shown: ``require_peer_certificate``)."""
    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(context, tls)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_peer_certificate else ssl.CERT_OPTIONAL
    context.on_failure = on_failure
    return context


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """For associations we open: the peer's certificate must chain to ``ca_certificates`` and name
    the host we call; ours goes along for peers that ask for one."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(context, tls)
    return context


def handshake_words(err: BaseException) -> str:
    """An ``ssl`` error as a short reason ("certificate verify failed: unable to get local issuer
    certificate", "tlsv1 alert unknown ca"), never with data from the connection."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {err.verify_message}"
    if isinstance(err, ssl.SSLError):
        return str(err.reason or type(err).__name__).lower().replace("_", " ")
    if isinstance(err, TimeoutError):
        return f"no TLS handshake within {HANDSHAKE_SECONDS:.0f} s"
    return err.strerror or type(err).__name__


def tls_failure(host: str, port: int, context: ssl.SSLContext, timeout: float) -> str | None:
    """Why DICOM TLS with ``host:port`` fails, or None when a handshake works. A peer that refuses
    our certificate answers after the handshake (TLS 1.3), so the check waits a moment for that."""
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 10.0)) as raw:
            with context.wrap_socket(raw, server_hostname=host) as secure:
                secure.settimeout(1.0)
                try:
                    secure.recv(1)
                except (TimeoutError, socket.timeout):
                    pass  # no alert: the peer accepted our certificate and waits for an association request
    except ssl.SSLError as err:
        return handshake_words(err)
    except OSError:
        return None  # not a TLS problem: the caller reports the connection failure as it is
    return None
