"""DIMSE with pynetdicom: C-ECHO, retrieval by C-GET or by C-MOVE to our own AE, and C-STORE with
a status check per instance.

Every failure becomes a ``PacsError`` naming the peer as ``AE@host:port`` and our AE title. With
the endpoint's ``dicom_tls`` every association (C-ECHO, C-GET, C-MOVE and its receiver, C-STORE)
speaks DICOM TLS with ``local.tls``; a failed handshake is an error that says why.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

from pydicom import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.status import QR_GET_SERVICE_CLASS_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category

from bundle.pacs.config import AcceptRule, Endpoint, PacsConfigError, TlsSettings
from bundle.pacs.protocol import PacsError, StoreOutcome, instance_file_name, write_durably
from bundle.pacs.security import AccessPolicy, client_context, reject, server_context, tls_failure

logger = logging.getLogger(__name__)

# What the bundle writes: requested explicitly (pynetdicom's StoragePresentationContexts lacks Parametric Map)
RESULT_SOP_CLASSES = (SecondaryCaptureImageStorage, MultiFrameTrueColorSecondaryCaptureImageStorage, ParametricMapStorage,
                      Comprehensive3DSRStorage)
MAX_CONTEXTS = 128  # per association, DICOM PS3.8


def status_words(code: int, meanings: dict = STORAGE_SERVICE_CLASS_STATUS) -> str:
    """``status 0xA700 (Refused: Out of Resources)``: the code and pynetdicom's words for it."""
    meaning = meanings.get(code, (code_to_category(code), ""))[1]
    return f"status 0x{code:04X}" + (f" ({meaning})" if meaning else "")


class DimsePeer:
    """One DIMSE peer (``endpoint``) as ``calling_ae`` reaches it: application entities with the endpoint's
    timeouts, and associations with it, over DICOM TLS with ``tls`` (``local.tls``) when the endpoint has
    ``dicom_tls``."""

    def __init__(self, endpoint: Endpoint, calling_ae: str, tls: TlsSettings | None = None):
        endpoint.require_dimse()
        if endpoint.dicom_tls and tls is None:
            raise PacsConfigError(f"endpoint {endpoint.name!r} has dicom_tls: give local.tls")
        self.endpoint = endpoint
        self.calling_ae = calling_ae
        self.tls = tls if endpoint.dicom_tls else None
        self._client_context = client_context(self.tls) if self.tls else None

    @property
    def description(self) -> str:
        secure = ", DICOM TLS" if self.tls else ""
        return f"{self.endpoint.dimse_address} (DIMSE{secure}, as {self.calling_ae})"

    def ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        timeout = self.endpoint.timeout_seconds
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = min(timeout, 10.0)
        return ae

    @contextmanager
    def association(self, ae: AE, what: str, **kwargs):
        """An established association with the peer, released afterwards; a PacsError otherwise."""
        assoc = self._associate(ae, what, **kwargs)
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _associate(self, ae: AE, what: str, tries: int = 3, **kwargs) -> Association:
        """Associate; an association that ends with neither an acceptance nor a rejection is tried
        again at once: a peer that rejects and closes the connection in one go can lose its
        rejection to the reset (seen with Orthanc on a loaded machine, a few percent of the time)."""
        e = self.endpoint
        if self._client_context is not None:
            kwargs["tls_args"] = (self._client_context, e.host)
        for _ in range(tries):
            try:
                assoc: Association = ae.associate(e.host, e.port, ae_title=e.ae_title, **kwargs)
            except OSError as err:  # e.g. the host name does not resolve
                raise PacsError(f"{what}: cannot connect to {e.dimse_address}: {err}") from None
            if assoc.is_established:
                return assoc
            if assoc.is_rejected:
                answer = assoc.acceptor.primitive
                permanent = answer is None or answer.result == 1
                reason = f"{answer.reason_str} ({answer.result_str})" if answer is not None else "no reason given"
                raise PacsError(f"{what}: association rejected by {e.dimse_address} for calling AE {self.calling_ae}: "
                                f"{reason}", retryable=not permanent)
            if self._client_context is not None:  # pynetdicom keeps a failed handshake's reason to itself
                failure = tls_failure(e.host, e.port, self._client_context, e.timeout_seconds)
                if failure:
                    raise PacsError(f"{what}: DICOM TLS with {e.dimse_address} failed: {failure}; its certificate must "
                                    f"chain to a CA in {self.tls.ca_certificates} and name {e.host}, and ours "
                                    f"({self.tls.certificate}) must be trusted there", retryable=False)
            time.sleep(0.1)
        raise PacsError(f"{what}: no DICOM association with {e.dimse_address}: connection refused, aborted or timed out")


class DimseClient:
    """C-ECHO, retrieval and C-STORE with one DIMSE peer (``endpoint``), as ``calling_ae`` (``DimsePeer``).

    ``retrieve_with``: "c-get" or "c-move". ``receive_port`` / ``bind_address``: where a temporary
    Storage SCP listens for C-MOVE sub-operations (our own AE's port; the peer must know our AE title,
    host and port); it accepts only the peer's AE title from the peer's host. ``tls``: ``local.tls``,
    used when the endpoint has ``dicom_tls``.
    """

    def __init__(self, endpoint: Endpoint, calling_ae: str, retrieve_with: str = "c-get",
                 receive_port: int | None = None, bind_address: str = "127.0.0.1", tls: TlsSettings | None = None):
        self.peer = DimsePeer(endpoint, calling_ae, tls)
        self.retrieve_with = retrieve_with
        self.receive_port = receive_port
        self.bind_address = bind_address

    @property
    def endpoint(self) -> Endpoint:
        return self.peer.endpoint

    @property
    def calling_ae(self) -> str:
        return self.peer.calling_ae

    @property
    def description(self) -> str:
        return self.peer.description

    def echo(self) -> None:
        """C-ECHO; raises PacsError unless the peer answers with success."""
        ae = self.peer.ae()
        ae.add_requested_context(Verification)
        with self.peer.association(ae, "C-ECHO") as assoc:
            status = assoc.send_c_echo()
        if not status or status.Status != 0x0000:
            code = f"0x{status.Status:04X}" if status else "no answer"
            raise PacsError(f"C-ECHO to {self.endpoint.dimse_address}: {code}")

    # -- retrieval ------------------------------------------------------------------------------

    def retrieve(self, study_uid: str, series_uid: str | None, folder: Path) -> int:
        """C-GET or C-MOVE the study (or one series) into ``folder``; the number of instances received."""
        folder.mkdir(parents=True, exist_ok=True)
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
        query.StudyInstanceUID = study_uid
        if series_uid:
            query.SeriesInstanceUID = series_uid
        received: list[Path] = []

        def on_store(event) -> int:
            path = folder / instance_file_name(str(event.request.AffectedSOPInstanceUID))
            try:
                write_durably(path, event.encoded_dataset())
            except OSError as err:
                logger.error("cannot write a retrieved instance into %s: %s", folder, err.strerror)
                return 0xA700
            received.append(path)
            return 0x0000

        if self.retrieve_with == "c-move":
            responses = self._c_move(query, on_store)
        else:
            responses = self._c_get(query, on_store)
        what = f"{self.retrieve_with.upper()} from {self.endpoint.dimse_address}"
        _check_retrieval(what, responses, self.calling_ae)
        count = len(set(received))
        if count == 0:
            raise PacsError(f"{what}: no instance of the requested {query.QueryRetrieveLevel.lower()} there", retryable=False)
        return count

    def _c_get(self, query: Dataset, on_store) -> list[Dataset]:
        ae = self.peer.ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        storage = [cx.abstract_syntax for cx in StoragePresentationContexts][: MAX_CONTEXTS - 1]
        for sop_class in storage:
            ae.add_requested_context(sop_class)
        roles = [build_role(sop_class, scp_role=True) for sop_class in storage]
        with self.peer.association(ae, "C-GET", ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
            return [status for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]

    def _c_move(self, query: Dataset, on_store) -> list[Dataset]:
        with move_destination(self.peer, self.receive_port, self.bind_address, on_store):
            ae = self.peer.ae()
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            with self.peer.association(ae, "C-MOVE") as assoc:
                return [status for status, _ in
                        assoc.send_c_move(query, self.peer.calling_ae, StudyRootQueryRetrieveInformationModelMove)]

    # -- storage --------------------------------------------------------------------------------

    def store(self, paths: list[Path]) -> dict[Path, StoreOutcome]:
        """C-STORE each file over one association; the peer's status per instance."""
        metas = {path: read_file_meta_info(path) for path in paths}
        ae = self.peer.ae()
        offered: dict[str, list[str]] = {str(sop): [ExplicitVRLittleEndian, ImplicitVRLittleEndian] for sop in RESULT_SOP_CLASSES}
        for meta in metas.values():
            syntaxes = offered.setdefault(str(meta.MediaStorageSOPClassUID), [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            if meta.TransferSyntaxUID not in syntaxes:
                syntaxes.insert(0, str(meta.TransferSyntaxUID))
        if len(offered) > MAX_CONTEXTS:
            raise PacsError(f"C-STORE to {self.endpoint.dimse_address}: {len(offered)} SOP classes in one batch", retryable=False)
        for sop_class, syntaxes in offered.items():
            ae.add_requested_context(sop_class, syntaxes)
        outcomes: dict[Path, StoreOutcome] = {}
        with self.peer.association(ae, "C-STORE") as assoc:
            for path in paths:
                if not assoc.is_established:
                    outcomes[path] = StoreOutcome(False, "association ended before this instance was sent")
                    continue
                try:
                    status = assoc.send_c_store(path)
                except ValueError:  # the peer accepted no presentation context for this SOP class
                    name = UID(metas[path].MediaStorageSOPClassUID).name
                    outcomes[path] = StoreOutcome(False, f"{self.endpoint.dimse_address} does not accept {name}")
                    continue
                outcomes[path] = _store_outcome(status)
        return outcomes


@contextmanager
def move_destination(peer: DimsePeer, port: int | None, bind_address: str, on_store):
    """While the block runs, a Storage SCP as ``peer.calling_ae`` on ``bind_address:port`` that takes the
    C-MOVE sub-operations with ``on_store``; only the peer's AE title from the peer's host may store into it."""
    receiver = peer.ae()
    receiver.require_called_aet = True
    for cx in StoragePresentationContexts:
        receiver.add_supported_context(cx.abstract_syntax)
    sender = AccessPolicy((AcceptRule(peer.endpoint.ae_title, peer.endpoint.host),))

    def on_requested(event) -> None:
        if sender.refusal(event.assoc.requestor.primitive.calling_ae_title, event.assoc.requestor.address):
            reject(event.assoc)

    try:
        server = receiver.start_server((bind_address, port), block=False,
                                       ssl_context=server_context(peer.tls) if peer.tls else None,
                                       evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_REQUESTED, on_requested)])
    except OSError as err:
        raise PacsError(f"C-MOVE: cannot receive as {peer.calling_ae} on port {port} ({err.strerror}); is the "
                        "listener running on it? Retrieve with c-get, or stop the listener", retryable=False) from None
    try:
        yield
    finally:
        server.shutdown()


def _store_outcome(status: Dataset) -> StoreOutcome:
    if not status or "Status" not in status:
        return StoreOutcome(False, "no answer (timeout or aborted association)")
    category = code_to_category(status.Status)
    return StoreOutcome(category in ("Success", "Warning"), status_words(status.Status))


def _check_retrieval(what: str, responses: list[Dataset], calling_ae: str) -> None:
    """Raise unless the last C-GET/C-MOVE response says every sub-operation succeeded."""
    final = next((s for s in reversed(responses) if s and "Status" in s), None)
    if final is None:
        raise PacsError(f"{what}: no answer (timeout or aborted association)")
    code = final.Status
    failed = int(final.get("NumberOfFailedSuboperations") or 0)
    if code == 0xA801:
        raise PacsError(f"{what}: the PACS does not know {calling_ae} as a move destination (status 0xA801); "
                        f"register our AE title, host and port there", retryable=False)
    if code_to_category(code) == "Failure":
        raise PacsError(f"{what}: failed with {status_words(code, QR_GET_SERVICE_CLASS_STATUS)}")
    if code != 0x0000 or failed:
        raise PacsError(f"{what}: {failed} instance(s) could not be retrieved "
                        f"({status_words(code, QR_GET_SERVICE_CLASS_STATUS)})")
