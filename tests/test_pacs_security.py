"""The DICOM node as a security officer wants it: closed by default, an accept list of AE title and
address checked at association time, DICOM TLS against a real Orthanc with DICOM TLS on, limits
that refuse with 0xA700 before writing and lose nothing acknowledged, and the audit trail.

Certificates come from a CA the test makes (``tests/certificates.py``); a second CA issues the
certificates that nobody may trust. Orthanc runs once for the module with DICOM TLS only.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from bundle.pacs.audit import AuditTrail
from bundle.pacs.config import REPOSITORY, PacsConfigError, load_config
from bundle.pacs.node import StorageNode
from bundle.pacs.pipeline import echo, retriever_for
from tests.certificates import CertificateAuthority
from tests.orthanc import OrthancServer, free_port, require_orthanc
from tests.pacs_support import (  # noqa: F401 (checkpoint is a fixture)
    OUR_AE,
    assert_no_identifier_in,
    assert_results_reference_the_sources,
    c_store,
    checkpoint,
    endpoint_of,
    make_source_study,
    pacs_cli,
    results_in,
    start_node,
    uploaded_study,
    write_config,
)

NOWHERE = {"pacs": {"ae_title": "NOWHERE", "host": "127.0.0.1", "port": 9}}  # a destination never reached


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The hospital's CA with certificates for Orthanc, our node and a modality; another CA's rogue."""
    folder = tmp_path_factory.mktemp("pki")
    trusted, other = CertificateAuthority(folder / "ca", "hospital-ca"), CertificateAuthority(folder / "other", "other-ca")
    return {"ca": trusted.certificate, "other_ca": other.certificate, "orthanc": trusted.issue("orthanc"),
            "node": trusted.issue("node"), "modality": trusted.issue("modality"), "rogue": other.issue("rogue")}


@pytest.fixture(scope="module")
def our_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def tls_pacs(tmp_path_factory, pki, our_port):
    """An Orthanc that speaks DICOM TLS only, requires a certificate from callers, trusts the
    hospital CA, and knows our AE (for C-MOVE, over TLS) at ``our_port``."""
    require_orthanc()
    orthanc = pki["orthanc"]
    server = OrthancServer(tmp_path_factory.mktemp("tls-orthanc"), "TLSPACS", {"ai": (OUR_AE, "127.0.0.1", our_port)},
                           dicom_tls=(orthanc.certificate, orthanc.private_key, pki["ca"])).start()
    yield server
    server.stop()


def local_tls(pki, identity: str = "node", ca: str = "ca") -> dict:
    return {"certificate": str(pki[identity].certificate), "private_key": str(pki[identity].private_key),
            "ca_certificates": str(pki[ca])}


def modality_tls(pki, identity: str | None = "modality") -> tuple[ssl.SSLContext, str]:
    """pynetdicom's ``tls_args`` for a modality calling the node: trusts the hospital CA, shows ``identity``."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if identity:
        context.load_cert_chain(pki[identity].certificate, pki[identity].private_key)
    return context, "127.0.0.1"


def with_local(path: Path, **local) -> Path:
    config = json.loads(path.read_text())
    config["local"].update(local)
    path.write_text(json.dumps(config))
    return path


# -- closed by default (no PACS needed) -----------------------------------------------------------

def test_the_node_listens_on_loopback_unless_told_and_never_on_the_network_without_an_accept_list(tmp_path, checkpoint):
    shipped = load_config(REPOSITORY / "configs" / "pacs.json")
    assert shipped.bind_address == "127.0.0.1" and shipped.listen.accept_from == ()
    unnamed = json.loads((REPOSITORY / "configs" / "pacs.json").read_text())
    del unnamed["local"]["bind_address"]
    (tmp_path / "unnamed.json").write_text(json.dumps(unnamed))
    assert load_config(tmp_path / "unnamed.json").bind_address == "127.0.0.1"

    port = free_port()
    everywhere = with_local(write_config(tmp_path / "open", checkpoint, port, NOWHERE), bind_address="0.0.0.0")
    refused = pacs_cli(everywhere, "listen", timeout=60)
    assert refused.returncode == 1
    assert (f"error: refusing to listen on all interfaces (local.bind_address '0.0.0.0', port {port}) with an empty "
            "listen.accept_from") in refused.stderr
    assert 'listen.accept_from, e.g. [{"ae_title": "CT_SCANNER", "host": "10.20.0.0/24"}]' in refused.stderr
    assert not (tmp_path / "open" / "incoming").exists()  # refused before anything was set up

    with pytest.raises(PacsConfigError, match=r"accept_from\[0\] must name a calling AE title and the host"):
        load_config(write_config(tmp_path / "old", checkpoint, port, NOWHERE, listen={"accept_from": ["MODALITY"]}))
    with pytest.raises(PacsConfigError, match="listen.tls asks for DICOM TLS: give local.tls"):
        load_config(write_config(tmp_path / "tls", checkpoint, port, NOWHERE, listen={"tls": True}))
    with pytest.raises(PacsConfigError, match="local.tls.certificate: no file"):
        bad = with_local(write_config(tmp_path / "missing", checkpoint, port, {"pacs": {**NOWHERE["pacs"], "dicom_tls": True}}),
                         tls={"certificate": str(tmp_path / "no.crt"), "private_key": "k", "ca_certificates": "c"})
        echo(load_config(bad), "pacs")


# -- limits (the node in this process, no PACS needed) --------------------------------------------

def limited_node(folder: Path, checkpoint: Path, **limits) -> tuple[StorageNode, int]:
    port = free_port()
    config = write_config(folder, checkpoint, port, NOWHERE, listen={"idle_seconds": 3600, **limits})
    node = StorageNode(load_config(config))
    node.start()
    return node, port


def received(folder: Path) -> dict[str, bytes]:
    """What waits in ``incoming``: SOP Instance UID -> pixel data; no half-written file anywhere."""
    assert not list((folder / "incoming").rglob("*.part"))
    return {ds.SOPInstanceUID: ds.PixelData for ds in map(pydicom.dcmread, (folder / "incoming").rglob("*.dcm"))}


def test_each_limit_refuses_with_out_of_resources_before_writing_and_keeps_what_was_acknowledged(tmp_path, checkpoint):
    study = make_source_study(tmp_path / "source", index=5)
    slices = [pydicom.dcmread(p) for p in study.files[:3]]
    pixels = {ds.SOPInstanceUID: ds.PixelData for ds in slices}

    node, port = limited_node(tmp_path / "instances", checkpoint, max_instances_per_association=2)
    try:
        assert c_store(port, slices) == [0x0000, 0x0000, 0xA700]  # the third is one too many for one association
        assert received(tmp_path / "instances") == {uid: pixels[uid] for uid in list(pixels)[:2]}
        assert c_store(port, slices[2:]) == [0x0000]  # a new association may send it
        assert received(tmp_path / "instances") == pixels
    finally:
        node.stop()
    size = max(p.stat().st_size for p in (tmp_path / "instances" / "incoming").rglob("*.dcm"))
    first, second = [line for line in AuditTrail(tmp_path / "instances" / "work").lines() if line["instances"]]
    assert (first["instances"], first["refused"], second["instances"]) == (2, {"0xA700 max_instances_per_association": 1}, 1)

    for limit, in_a_new_association in (("max_bytes_per_association", 0x0000), ("max_incoming_bytes", 0xA700)):
        node, port = limited_node(tmp_path / limit, checkpoint, **{limit: 2 * size + size // 2})
        try:
            assert c_store(port, slices) == [0x0000, 0x0000, 0xA700], limit
            assert c_store(port, slices[2:]) == [in_a_new_association], limit  # incoming_dir stays full
            assert len(received(tmp_path / limit)) == 2 + (in_a_new_association == 0x0000)
        finally:
            node.stop()
        assert {uid: pixels[uid] for uid in received(tmp_path / limit)} == received(tmp_path / limit)
        refusals = [line["refused"] for line in AuditTrail(tmp_path / limit / "work").lines() if line["refused"]]
        assert refusals[0] == {f"0xA700 {limit}": 1}

    node, port = limited_node(tmp_path / "disk", checkpoint,
                              min_free_disk_bytes=shutil.disk_usage(tmp_path).free + 10**12)
    try:
        assert c_store(port, slices[:1]) == [0xA700]  # not enough free disk: refused, nothing begun
        assert received(tmp_path / "disk") == {}
    finally:
        node.stop()
    (line,) = [line for line in AuditTrail(tmp_path / "disk" / "work").lines() if line["refused"]]
    assert line["refused"] == {"0xA700 min_free_disk_bytes": 1} and line["instances"] == 0


def test_a_peer_certificate_is_optional_only_where_configured(tmp_path, pki, checkpoint):
    port = free_port()
    config = write_config(tmp_path, checkpoint, port, NOWHERE, listen={"idle_seconds": 3600, "tls": True})
    with_local(config, tls={**local_tls(pki), "require_peer_certificate": False})
    node = StorageNode(load_config(config))
    node.start()
    try:
        assert association(port, "MODALITY", modality_tls(pki, None)) == "accepted"  # shows none: accepted
        assert association(port, "MODALITY", modality_tls(pki)) == "accepted"
        assert association(port, "MODALITY", modality_tls(pki, "rogue")) == "no association"  # one shown is checked
    finally:
        node.stop()
    results = [line["result"] for line in AuditTrail(tmp_path / "work").lines()]
    assert results[:2] == ["accepted", "accepted"] and results[2].startswith("rejected: "), results


# -- DICOM TLS against Orthanc --------------------------------------------------------------------

def test_echo_c_get_and_c_move_work_over_dicom_tls(tls_pacs, pki, tmp_path, checkpoint, our_port):
    study = uploaded_study(tls_pacs, tmp_path / "source", index=6)
    config = load_config(with_local(write_config(tmp_path, checkpoint, our_port,
                                                 {"pacs": endpoint_of(tls_pacs, dicom_tls=True)}), tls=local_tls(pki)))
    address = f"TLSPACS@127.0.0.1:{tls_pacs.dicom_port}"
    assert dict(echo(config, "pacs"))[f"C-ECHO {address} (DIMSE, DICOM TLS, as {OUR_AE})"] is None
    for protocol in ("c-get", "c-move"):  # C-MOVE: Orthanc opens a TLS association back to our receiver
        folder = tmp_path / protocol
        assert retriever_for(config, "pacs", protocol).retrieve(study.study, None, folder) == len(study.files)
        assert {pydicom.dcmread(p).SOPInstanceUID for p in folder.glob("*.dcm")} == {*study.ct_instances,
                                                                                     study.cr_instance}


def test_a_peer_whose_certificate_comes_from_another_ca_is_a_clear_error_naming_the_endpoint(tls_pacs, pki, tmp_path,
                                                                                             checkpoint, our_port):
    address = f"TLSPACS@127.0.0.1:{tls_pacs.dicom_port}"
    endpoints = {"pacs": endpoint_of(tls_pacs, dicom_tls=True)}
    distrusting = load_config(with_local(write_config(tmp_path / "a", checkpoint, our_port, endpoints),
                                         tls=local_tls(pki, ca="other_ca")))  # Orthanc's CA is not among ours
    (_, error), _ = echo(distrusting, "pacs")
    assert error.startswith(f"C-ECHO: DICOM TLS with {address} failed: certificate verify failed: "), error
    assert f"; its certificate must chain to a CA in {pki['other_ca']} and name 127.0.0.1" in error
    distrusted = load_config(with_local(write_config(tmp_path / "b", checkpoint, our_port, endpoints),
                                        tls=local_tls(pki, identity="rogue")))  # ours is not from Orthanc's CA
    (_, error), _ = echo(distrusted, "pacs")
    assert error.startswith(f"C-ECHO: DICOM TLS with {address} failed: ") and "alert" in error, error
    assert f"ours ({pki['rogue'].certificate}) must be trusted there" in error
    plain = load_config(write_config(tmp_path / "c", checkpoint, our_port, {"pacs": endpoint_of(tls_pacs)}))
    (_, error), _ = echo(plain, "pacs")  # no TLS towards a TLS-only peer: no association, and it says with whom
    assert error.startswith(f"C-ECHO: no DICOM association with {address}")


# -- the node over TLS: who may call, a limit, the audit trail --------------------------------------

def association(port: int, ae_title: str, tls_args) -> str:
    """Try an association with the node: "accepted", "rejected: <reason>" or "no association"."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=OUR_AE, tls_args=tls_args)
    if assoc.is_established:
        assoc.release()
        return "accepted"
    return f"rejected: {assoc.acceptor.primitive.reason_str}" if assoc.is_rejected else "no association"


def test_the_tls_node_admits_only_its_accept_list_keeps_a_limit_and_audits_every_association(tls_pacs, pki, tmp_path,
                                                                                             checkpoint):
    study = make_source_study(tmp_path / "source", index=7)  # not on the PACS: the node sends it in
    port = free_port()
    config = with_local(write_config(tmp_path, checkpoint, port, {"pacs": endpoint_of(tls_pacs, dicom_tls=True)}, listen={
        "destination": "pacs", "send_with": "c-store", "idle_seconds": 2, "tls": True, "max_instances_per_association": 2,
        "accept_from": [{"ae_title": "MODALITY", "host": "127.0.0.1"}, {"ae_title": "FARAWAY", "host": "10.9.8.0/24"}]}),
        tls=local_tls(pki))
    log = tmp_path / "node.log"
    node = start_node(config, port, log, tls_args=modality_tls(pki))
    silent = socket.create_connection(("127.0.0.1", port))  # connects and never starts its TLS handshake
    try:
        rejected = "rejected: Calling AE title not recognised"
        assert association(port, "NOBODY", modality_tls(pki)) == rejected  # not on the list
        assert association(port, "FARAWAY", modality_tls(pki)) == rejected  # on the list, from elsewhere
        assert association(port, "MODALITY", modality_tls(pki, "rogue")) == "no association"  # another CA's certificate
        assert association(port, "MODALITY", modality_tls(pki, None)) == "no association"  # no certificate
        assert association(port, "MODALITY", None) == "no association"  # no TLS
        slices = [pydicom.dcmread(p) for p in study.files[:3]]
        assert c_store(port, slices, tls_args=modality_tls(pki)) == [0x0000, 0x0000, 0xA700]
        assert c_store(port, slices[2:], tls_args=modality_tls(pki)) == [0x0000]
        trail = AuditTrail(tmp_path / "work")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any(line["event"] == "forwarded" for line in trail.lines()):
            time.sleep(0.5)
        assert_results_reference_the_sources(results_in(tls_pacs, study), study, set(study.ct_instances))
    finally:
        silent.close()
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=60) == 0
    lines = trail.lines()
    calls = [line for line in lines if line["event"] == "association"]
    assert {(c["peer_ae_title"], c["peer_address"], c["result"]) for c in calls if c["result"] != "accepted"} == {
        ("NOBODY", "127.0.0.1", "rejected: calling AE title not in listen.accept_from"),
        ("FARAWAY", "127.0.0.1", "rejected: calling AE title not accepted from this address")}
    stores = [c for c in calls if c["instances"]]
    assert [(c["peer_ae_title"], c["tls"], c["instances"], c["sop_classes"], c["refused"]) for c in stores] == [
        ("MODALITY", True, 2, {"CT Image Storage": 2}, {"0xA700 max_instances_per_association": 1}),
        ("MODALITY", True, 1, {"CT Image Storage": 1}, {})]
    tls_refusals = [line for line in lines if line["event"] == "tls-refused"]
    assert len(tls_refusals) == 4 and {line["peer_address"] for line in tls_refusals} == {"127.0.0.1"}
    reasons = [line["result"] for line in tls_refusals]  # the silent caller held up the others for 10 s at most
    assert reasons[0] == "rejected: no TLS handshake within 10 s" and "certificate verify failed" in reasons[1], reasons
    (forwarded,) = [line for line in lines if line["event"] == "forwarded"]
    assert forwarded["associations"] == sorted(c["association"] for c in stores)
    assert forwarded["stored"] == {"Comprehensive 3D SR": 3, "Parametric Map": 3, "Secondary Capture": 3}
    assert forwarded["pending"] == {}
    assert forwarded["destination"].startswith(f"TLSPACS@127.0.0.1:{tls_pacs.dicom_port} (DIMSE, DICOM TLS")
    assert_no_identifier_in(trail.path.read_text() + log.read_text(), study)
    assert "rejected an association from FARAWAY at 127.0.0.1: calling AE title not accepted from this address" in \
        log.read_text()
