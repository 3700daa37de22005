"""PACS integration against a real Orthanc: C-ECHO and DICOMweb, the on-demand round trip by WADO-RS
/ STOW-RS and by C-GET / C-MOVE / C-STORE, clear errors for wrong credentials, a wrong AE title and an
untrusted certificate, a PACS that is down or refuses a store, and the DICOM node across a kill.

Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``, installed by ``make test``) runs as
a plain process on free loopback ports with authentication and called-AE checks on; the tests
that need it skip, saying so, only where it is not installed.
"""

from __future__ import annotations

import json
import signal
import tempfile
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from bundle.pacs.audit import AuditTrail
from bundle.pacs.config import REPOSITORY, Credentials, Endpoint, PacsConfigError, load_config
from bundle.pacs.dicomweb import DicomWebService
from bundle.pacs.outbox import Job, jobs_in
from bundle.pacs.pipeline import echo, resend, retriever_for, run_study
from bundle.pacs.protocol import PacsError
from tests.certificates import CertificateAuthority
from tests.orthanc import OrthancServer, TlsTerminator, free_port, require_orthanc
from tests.pacs_support import (  # noqa: F401 (checkpoint and credentials are fixtures)
    FAST_RETRY,
    OUR_AE,
    PASSWORD,
    PM,
    assert_no_identifier_in,
    assert_no_password_under,
    assert_results_reference_the_sources,
    c_store,
    checkpoint,
    credentials,
    endpoint_of,
    make_source_study,
    pacs_cli,
    results_in,
    start_node,
    uploaded_study,
    write_config,
)

# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def our_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, our_port):
    """The PACS every test reads from: knows our AE (for C-GET and C-MOVE) at ``our_port``."""
    require_orthanc()
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), "TESTPACS", {"ai": (OUR_AE, "127.0.0.1", our_port)})
    server.start()
    yield server
    server.stop()


# -- configuration and credentials (no PACS needed) -------------------------------------------------

def test_credentials_come_from_the_environment_or_a_file_outside_the_repository(tmp_path, monkeypatch):
    outside = tmp_path / "credentials.json"
    outside.write_text(json.dumps({"username": "reader", "password": "from-the-file"}))
    endpoint = Endpoint("pacs", dicomweb_url="https://pacs.example.org/dicom-web", username_env="TEST_U",
                        password_env="TEST_P", credentials_file=str(outside))
    monkeypatch.delenv("TEST_U", raising=False)
    monkeypatch.delenv("TEST_P", raising=False)
    assert endpoint.credentials() == Credentials("reader", "from-the-file")
    monkeypatch.setenv("TEST_U", "env-user")
    monkeypatch.setenv("TEST_P", "env-secret")
    assert endpoint.credentials() == Credentials("env-user", "env-secret")  # the environment wins
    assert "env-secret" not in repr(endpoint.credentials())
    monkeypatch.delenv("TEST_U")
    with tempfile.TemporaryDirectory(dir=REPOSITORY) as inside:
        leaked = Path(inside) / "credentials.json"
        leaked.write_text(outside.read_text())
        with pytest.raises(PacsConfigError, match="inside the repository") as refused:
            Endpoint("pacs", credentials_file=str(leaked)).credentials()
        assert "from-the-file" not in str(refused.value)


def test_the_config_refuses_secrets_and_unknown_protocols(tmp_path, checkpoint):
    url_with_password = {"pacs": {"dicomweb_url": "https://reader:secret@pacs.example.org/dicom-web"}}
    with pytest.raises(PacsConfigError, match="must not hold credentials") as refused:
        load_config(write_config(tmp_path / "a", checkpoint, 104, url_with_password))
    assert "secret" not in str(refused.value).replace("must not hold credentials", "")
    with pytest.raises(PacsConfigError, match="unknown keys"):
        load_config(write_config(tmp_path / "b", checkpoint, 104, {"pacs": {"password": "secret"}}))
    with pytest.raises(PacsConfigError, match="retrieve_with must be one of"):
        load_config(write_config(tmp_path / "c", checkpoint, 104, {"pacs": {}}, run={"retrieve_with": "ftp"}))
    shipped = load_config(REPOSITORY / "configs" / "pacs.json")
    assert shipped.endpoint(shipped.run.source).credentials_file.startswith("~")


# -- reachability and clear errors ----------------------------------------------------------------

def test_echo_reaches_the_pacs_over_dimse_and_dicomweb(pacs, tmp_path, checkpoint, our_port):
    config = write_config(tmp_path, checkpoint, our_port, {"pacs": endpoint_of(pacs)})
    result = pacs_cli(config, "echo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"C-ECHO TESTPACS@127.0.0.1:{pacs.dicom_port} (DIMSE, as {OUR_AE}): ok" in result.stdout
    assert f"QIDO-RS {pacs.dicomweb_url} (DICOMweb): ok" in result.stdout


def test_wrong_credentials_give_an_error_naming_the_url_and_not_the_password(pacs, tmp_path, checkpoint, our_port):
    config = write_config(tmp_path, checkpoint, our_port, {"pacs": endpoint_of(pacs)})
    wrong = "not-the-password-4711"
    result = pacs_cli(config, "echo", password=wrong)
    assert result.returncode == 1
    assert f"{pacs.dicomweb_url} refused the credentials (HTTP 401" in result.stdout
    assert "TEST_PACS_USER / TEST_PACS_PASSWORD" in result.stdout  # where to fix them
    assert wrong not in result.stdout + result.stderr and PASSWORD not in result.stdout + result.stderr


def test_a_wrong_called_ae_title_is_an_association_rejected_error(pacs, tmp_path, checkpoint, our_port, credentials):
    config = load_config(write_config(tmp_path, checkpoint, our_port, {"pacs": endpoint_of(pacs, ae_title="NOT_TESTPACS")},
                                      run={"retrieve_with": "c-get", "send_with": "c-store"}))
    (what, error), _ = echo(config, "pacs")
    assert error == (f"C-ECHO: association rejected by NOT_TESTPACS@127.0.0.1:{pacs.dicom_port} for calling AE {OUR_AE}: "
                     "Called AE title not recognised (Rejected Permanent)")
    with pytest.raises(PacsError, match=f"C-GET: association rejected by NOT_TESTPACS@127.0.0.1:{pacs.dicom_port}"):
        run_study(config, "1.2.3.4")
    assert not list((tmp_path / "work").rglob("*.dcm")) and not jobs_in(tmp_path / "outbox")


def test_https_verifies_the_certificate_and_trusts_a_given_ca(pacs, tmp_path, checkpoint, our_port, credentials):
    authority = CertificateAuthority(tmp_path / "pki", "https-ca")
    server = authority.issue("dicomweb")
    https = TlsTerminator(server.certificate, server.private_key, backend_port=pacs.http_port)
    url = f"https://127.0.0.1:{https.port}/dicom-web"
    try:
        untrusted = load_config(write_config(tmp_path / "a", checkpoint, our_port,
                                             {"pacs": endpoint_of(pacs, dicomweb_url=url)}))
        error = dict(echo(untrusted, "pacs"))[f"QIDO-RS {url} (DICOMweb)"]
        assert error.startswith(f"QIDO-RS: TLS certificate verification failed for {url}")
        trusted = load_config(write_config(tmp_path / "b", checkpoint, our_port,
                                           {"pacs": endpoint_of(pacs, dicomweb_url=url, ca_bundle=str(authority.certificate))}))
        assert dict(echo(trusted, "pacs"))[f"QIDO-RS {url} (DICOMweb)"] is None
    finally:
        https.close()


# -- on demand ------------------------------------------------------------------------------------

def test_on_demand_over_dicomweb_puts_references_to_the_sources_into_the_same_study(pacs, tmp_path, checkpoint, our_port,
                                                                                     credentials):
    study = uploaded_study(pacs, tmp_path / "source", index=1)
    config = write_config(tmp_path, checkpoint, our_port, {"pacs": endpoint_of(pacs)},
                          run={"retrieve_with": "wado-rs", "send_with": "stow-rs"})
    result = pacs_cli(config, "run", "--study", study.study)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert (f"stored at {pacs.dicomweb_url} (DICOMweb): 4 Comprehensive 3D SR, 3 Parametric Map, 4 Secondary Capture "
            "(5 new series in 1 source study)") in result.stdout
    assert_results_reference_the_sources(results_in(pacs, study), study, {*study.ct_instances, study.cr_instance})
    (job,) = jobs_in(tmp_path / "outbox")
    assert job.processed == 4 and not job.pending()
    assert {f.delivered_to for f in job.files} == {f"{pacs.dicomweb_url} (DICOMweb)"}
    assert_no_identifier_in(result.stdout + result.stderr, study)
    assert_no_password_under(tmp_path / "outbox", tmp_path / "work")
    assert not list((tmp_path / "work").rglob("*.dcm"))  # retrieved sources are dropped once the results exist
    # the reports, found on the PACS by QIDO-RS and fetched by WADO-RS, say what predictions.json says
    client = DicomWebService(load_config(config).endpoint("pacs")).client
    reports = [client.retrieve_instance(study.study, series["0020000E"]["Value"][0], instance["00080018"]["Value"][0])
               for series in client.search_for_series(study.study, search_filters={"Modality": "SR"})
               for instance in client.search_for_instances(study.study, series["0020000E"]["Value"][0])]
    records = {Path(path).stem: record for record in json.loads((job.folder / "results" / "predictions.json").read_text())
               for path in record["outputs"].get("sr", [])}
    assert len(reports) == len(records) == 4
    for ds in reports:
        (group,) = hd.sr.Comprehensive3DSR.from_dataset(ds).content.get_image_measurement_groups()
        record = records[ds.SOPInstanceUID]
        assert group.finding_type.meaning.lower() == record["predicted_label"]
        read = {m.name.meaning.removeprefix("Probability of "): m.value for m in group.get_measurements()}
        assert read == pytest.approx({"no lesion": record["p_no lesion"], "lesion": record["p_lesion"]}, abs=1e-6)


def test_each_retrieval_protocol_brings_exactly_the_requested_instances(pacs, tmp_path, checkpoint, our_port,
                                                                         credentials):
    study = uploaded_study(pacs, tmp_path / "source", index=2)
    sources = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).PixelData for p in study.files}
    config = load_config(write_config(tmp_path, checkpoint, our_port, {"pacs": endpoint_of(pacs)}))
    for protocol in ("wado-rs", "c-get", "c-move"):
        retriever = retriever_for(config, "pacs", protocol)
        for series, expected in ((None, sources), (study.ct_series, set(study.ct_instances))):
            folder = tmp_path / protocol / (series or "study")
            assert retriever.retrieve(study.study, series, folder) == len(expected)
            got = {ds.SOPInstanceUID: ds.PixelData for ds in map(pydicom.dcmread, folder.glob("*.dcm"))}
            assert set(got) == set(expected) and all(got[uid] == sources[uid] for uid in got), protocol
            assert not any(uid in p.name for p in folder.iterdir() for uid in got)  # file names do not spell UIDs
    with pytest.raises(PacsError, match=f"WADO-RS: not found at {pacs.dicomweb_url}"):
        retriever_for(config, "pacs", "wado-rs").retrieve("1.2.3.4", None, tmp_path / "none")
    with pytest.raises(PacsError, match=r"C-GET from TESTPACS@.*: failed with status 0xC000 \(Unable to Process\)"):
        retriever_for(config, "pacs", "c-get").retrieve("1.2.3.4", None, tmp_path / "none")


@pytest.fixture(scope="module")
def outage(pacs, tmp_path_factory, checkpoint, our_port):
    """On demand for one series, retrieved by C-GET, while the archive to send to (C-STORE) is down."""
    folder = tmp_path_factory.mktemp("outage")
    study = uploaded_study(pacs, folder / "source", index=3)
    archive = OrthancServer(folder / "archive", "ARCHIVE", {}).start()
    archive.stop()
    config = write_config(folder, checkpoint, our_port, {"pacs": endpoint_of(pacs), "archive": endpoint_of(archive)},
                          run={"retrieve_with": "c-get", "destination": "archive", "send_with": "c-store"})
    report = run_study(load_config(config), study.study, study.ct_series)  # DIMSE needs no credentials
    yield study, config, archive, report
    archive.stop()


def test_a_pacs_that_is_down_leaves_results_in_the_outbox_until_resend(outage, credentials):
    study, config, archive, report = outage
    assert not report.complete and report.stored == {} and report.processed == 3  # the CR was not asked for
    assert report.pending == {"Secondary Capture": 3, "Parametric Map": 3, "Comprehensive 3D SR": 3}
    assert f"no DICOM association with ARCHIVE@127.0.0.1:{archive.dicom_port}" in report.error
    assert any("NOT delivered" in line and "resend" in line for line in report.lines())
    job = Job.load(report.folder)
    assert len(job.pending()) == 9 and {f.attempts for f in job.files} == {FAST_RETRY["attempts"]}
    assert all((job.folder / f.path).is_file() for f in job.files)

    archive.start()
    delivered = pacs_cli(config, "resend")
    assert delivered.returncode == 0, delivered.stdout + delivered.stderr[-3000:]
    assert (f"stored at ARCHIVE@127.0.0.1:{archive.dicom_port} (DIMSE, as {OUR_AE}): 3 Comprehensive 3D SR, "
            "3 Parametric Map, 3 Secondary Capture (3 new series in 1 source study)") in delivered.stdout
    assert_results_reference_the_sources(results_in(archive, study), study, set(study.ct_instances))
    assert archive.instance_count() == 9
    nothing = pacs_cli(config, "resend")
    assert nothing.returncode == 0 and "nothing to send" in nothing.stdout
    for protocol in ("c-store", "stow-rs"):  # the same results again: the same SOP Instance UIDs, no duplicate
        again = pacs_cli(config, "resend", "--again", "--send-with", protocol)
        assert again.returncode == 0, again.stderr[-3000:]
        assert archive.instance_count() == 9
    assert_no_identifier_in(delivered.stdout + delivered.stderr + again.stdout + again.stderr, study)
    assert_no_password_under(job.folder)


def test_a_store_the_pacs_refuses_stays_pending_with_its_status(outage, tmp_path):
    """An archive whose storage script fails for Parametric Maps: the SCs and reports get there, the maps wait."""
    _, config, _, report = outage
    refuse_maps = ('function ReceivedInstanceFilter(dicom, origin, info)\n'
                   f'  if dicom.SOPClassUID == "{PM}" then error("no parametric maps here") end\n'
                   '  return true\nend\n')
    refusing = OrthancServer(tmp_path / "refusing", "REFUSING", {}, lua_script=refuse_maps).start()
    try:
        settings = json.loads(config.read_text())
        settings["endpoints"]["refusing"] = endpoint_of(refusing)
        config = tmp_path / "pacs.json"
        config.write_text(json.dumps(settings))
        tried_before = {f.path: f.attempts for f in Job.load(report.folder).files}
        (partial,) = resend(load_config(config), [report.job_id], again=True, destination="refusing", send_with="c-store")
        assert partial.stored == {"Secondary Capture": 3, "Comprehensive 3D SR": 3}
        assert partial.pending == {"Parametric Map": 3}
        assert f"not stored at REFUSING@127.0.0.1:{refusing.dicom_port}" in partial.error
        waiting = Job.load(partial.folder).pending()
        assert {f.kind for f in waiting} == {"Parametric Map"}
        assert {f.status for f in waiting} == {"status 0xA700 (Refused: Out of Resources)"}
        assert {f.attempts - tried_before[f.path] for f in waiting} == {FAST_RETRY["attempts"]}  # retried, then kept
        assert refusing.instance_count() == 6
    finally:
        refusing.stop()


# -- the DICOM node -------------------------------------------------------------------------------

def test_the_node_keeps_what_it_acknowledged_across_a_kill_and_forwards_the_results(pacs, tmp_path, checkpoint):
    study = make_source_study(tmp_path / "source", index=4)  # not on the PACS: the node sends it in
    port = free_port()
    endpoints = {"pacs": endpoint_of(pacs)}
    waiting = write_config(tmp_path / "first", checkpoint, port, endpoints,
                           listen={"destination": "pacs", "send_with": "stow-rs", "idle_seconds": 3600, "queue_size": 3})
    config = json.loads(waiting.read_text())
    config.update(incoming_dir=str(tmp_path / "incoming"), work_dir=str(tmp_path / "work"),
                  outbox_dir=str(tmp_path / "outbox"))
    waiting.write_text(json.dumps(config))
    config["listen"].update(idle_seconds=1, queue_size=100)
    forwarding = tmp_path / "forwarding.json"
    forwarding.write_text(json.dumps(config))

    slices = [pydicom.dcmread(p) for p in study.files[:3]]
    no_pixels = pydicom.dcmread(study.files[0])
    del no_pixels.PixelData
    log = tmp_path / "node.log"
    node = start_node(waiting, port, log)
    try:
        assert c_store(port, [no_pixels]) == [0xA900]  # refused, logged, and the node goes on
        assert c_store(port, slices) == [0x0000] * 3
        assert c_store(port, [pydicom.dcmread(study.files[3])]) == [0xA700]  # queue full: the CR is refused
        assert len(list((tmp_path / "incoming").rglob("*.dcm"))) == 3  # written before acknowledged; the CR never
    finally:
        node.send_signal(signal.SIGKILL)  # no chance to tidy up
        node.wait()
    assert not results_in(pacs, study)

    node = start_node(forwarding, port, log)
    try:
        forwarded = AuditTrail(tmp_path / "work")  # the node's word that the job was delivered
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any(line["event"] == "forwarded" for line in forwarded.lines()):
            time.sleep(0.5)
        assert_results_reference_the_sources(results_in(pacs, study), study, set(study.ct_instances))
    finally:
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=60) == 0
    text = log.read_text()
    assert "refused a CT Image Storage instance from MODALITY: no pixel data" in text
    assert "queue full" in text
    assert_no_identifier_in(text, study)
    assert_no_password_under(tmp_path / "outbox", tmp_path / "incoming", tmp_path / "work")
    assert not list((tmp_path / "incoming").rglob("*.dcm"))
