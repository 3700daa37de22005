"""What the PACS test modules share: a source study on the PACS, test configurations, the command
line, a node started as a process, a modality's C-STORE, and the checks on what reached the PACS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, CTImageStorage, Verification

from bundle.networks import classifier
from bundle.pacs.config import REPOSITORY
from bundle.synthetic import CaseIdentity, ct_affine, ct_volume, radiograph, write_cr_dicom, write_ct_series
from tests.conftest import save_described_checkpoint
from tests.orthanc import PASSWORD, USER, OrthancServer

OUR_AE = "EVIDENCE_AI"
SC, PM, SR = "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.88.34"
CREDENTIALS = {"TEST_PACS_USER": USER, "TEST_PACS_PASSWORD": PASSWORD}
# the checkpoint describes its network and preprocessing: the PACS commands give it alone
MODEL = {"num_workers": 0, "writer_processes": 1}
FAST_RETRY = {"attempts": 2, "first_delay_seconds": 0.05, "factor": 2.0, "max_delay_seconds": 0.2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    network = classifier("resnet18", spatial_dims=2, backbone_kwargs={"widen_factor": 0.125})
    return save_described_checkpoint(network, path, image_size=32, model_name="resnet18-softcam")

@pytest.fixture
def credentials(monkeypatch):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)

@dataclass
class SourceStudy:
    """A study on the PACS: a CT series of three 32 x 32 slices and a CR image, one patient."""

    study: str
    ct_series: str
    cr_series: str
    ct_instances: list[str]
    cr_instance: str
    files: list[Path]
    identifiers: list[str]  # what must never show in logs or reports


def make_source_study(folder: Path, index: int) -> SourceStudy:
    rng = np.random.default_rng(index)
    identity = CaseIdentity(index, seed=17)
    shape = (32, 32, 3)
    hu, _ = ct_volume(rng, shape, lesion_type=1)
    write_ct_series(folder / "ct", hu, ct_affine(rng, shape), identity)
    cr_path = folder / "cr.dcm"
    write_cr_dicom(cr_path, radiograph(rng, (32, 32), lesion_type=0)[0], identity, rng)
    cr = pydicom.dcmread(cr_path)  # same patient and study as the CT, a series and instance of its own
    cr.SeriesInstanceUID = generate_uid(entropy_srcs=[f"pacs-test/{index}/cr-series"])
    cr.SOPInstanceUID = cr.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"pacs-test/{index}/cr"])
    cr.save_as(cr_path)
    ct = [pydicom.dcmread(p) for p in sorted((folder / "ct").glob("*.dcm"))]
    identifiers = [str(ct[0].PatientName), ct[0].PatientID, ct[0].StudyInstanceUID, ct[0].SeriesInstanceUID,
                   cr.SeriesInstanceUID, cr.SOPInstanceUID, *(d.SOPInstanceUID for d in ct)]
    return SourceStudy(ct[0].StudyInstanceUID, ct[0].SeriesInstanceUID, cr.SeriesInstanceUID,
                       [d.SOPInstanceUID for d in ct], cr.SOPInstanceUID, [*sorted((folder / "ct").glob("*.dcm")), cr_path],
                       identifiers)


def uploaded_study(pacs: OrthancServer, folder: Path, index: int) -> SourceStudy:
    study = make_source_study(folder, index)
    pacs.upload(study.files)
    return study


def write_config(folder: Path, checkpoint: Path, our_port: int, endpoints: dict, **sections) -> Path:
    """A configs/pacs.json for the tests: our AE on ``our_port``, folders under ``folder``."""
    config = {
        "local": {"ae_title": OUR_AE, "bind_address": "127.0.0.1", "port": our_port},
        "endpoints": endpoints,
        "incoming_dir": str(folder / "incoming"), "work_dir": str(folder / "work"), "outbox_dir": str(folder / "outbox"),
        "retry": FAST_RETRY,
        "inference": {"ckpt_path": str(checkpoint), "overrides": MODEL},
        **sections,
    }
    path = folder / "pacs.json"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1))
    return path


def endpoint_of(server: OrthancServer, ae_title: str | None = None, **extra) -> dict:
    return {"ae_title": ae_title or server.ae_title, "host": "127.0.0.1", "port": server.dicom_port,
            "dicomweb_url": server.dicomweb_url, "username_env": "TEST_PACS_USER", "password_env": "TEST_PACS_PASSWORD",
            "timeout_seconds": 5, **extra}


def pacs_cli(config: Path, *args: str, password: str = PASSWORD, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "TEST_PACS_USER": USER, "TEST_PACS_PASSWORD": password}
    return subprocess.run([sys.executable, "scripts/pacs.py", "--config", str(config), *args], cwd=REPOSITORY,
                          capture_output=True, text=True, env=environment, timeout=timeout)


def results_in(server: OrthancServer, study: SourceStudy) -> dict[str, list[pydicom.Dataset]]:
    """The study's instances on ``server`` that are not the sources, by SOP class."""
    found: dict[str, list[pydicom.Dataset]] = {}
    for ds in server.datasets_of_study(study.study):
        if ds.SOPInstanceUID not in [*study.ct_instances, study.cr_instance]:
            found.setdefault(ds.SOPClassUID, []).append(ds)
    return found


def assert_results_reference_the_sources(results: dict, study: SourceStudy, sc_sources: set[str]) -> None:
    """Every SC, Parametric Map and SR lies in the source study and points at its source instances (the 2D
    model takes each image alone: an SC and a report per image)."""
    captures, maps, reports = results.get(SC, []), results.get(PM, []), results.get(SR, [])
    assert {ds.StudyInstanceUID for ds in captures + maps + reports} == {study.study}
    sources_of_reports = [item.ReferencedSOPInstanceUID for ds in reports
                          for evidence in ds.CurrentRequestedProcedureEvidenceSequence
                          for series in evidence.ReferencedSeriesSequence for item in series.ReferencedSOPSequence
                          if item.ReferencedSOPInstanceUID in sc_sources]
    assert sorted(sources_of_reports) == sorted(sc_sources)
    assert {ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in captures} == sc_sources
    assert len(captures) == len(sc_sources)
    # a Parametric Map only where there is a Frame of Reference: the CT slices, one map each
    referenced = {(series.SeriesInstanceUID, item.ReferencedSOPInstanceUID)
                  for ds in maps for series in ds.ReferencedSeriesSequence for item in series.ReferencedInstanceSequence}
    assert referenced == {(study.ct_series, uid) for uid in study.ct_instances}
    assert len(maps) == len(study.ct_instances)


def assert_no_identifier_in(text: str, study: SourceStudy) -> None:
    for identifier in study.identifiers:
        assert identifier not in text, "a patient identifier or UID reached the logs or the report"


def assert_no_password_under(*folders: Path) -> None:
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file():
                assert PASSWORD.encode() not in path.read_bytes(), path


def start_node(config: Path, port: int, log: Path, tls_args: tuple | None = None) -> subprocess.Popen:
    """``scripts/pacs.py listen`` as a process; returns once it answers C-ECHO (over TLS with ``tls_args``,
    pynetdicom's ``(ssl.SSLContext, server host name)``)."""
    environment = {**os.environ, **CREDENTIALS}
    process = subprocess.Popen([sys.executable, "scripts/pacs.py", "--config", str(config), "listen"], cwd=REPOSITORY,
                               env=environment, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        assoc = ae.associate("127.0.0.1", port, ae_title=OUR_AE, tls_args=tls_args)
        if assoc.is_established:
            assoc.release()
            return process
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"the node did not answer C-ECHO: {log.read_text()[-3000:]}")


def c_store(port: int, datasets: list[pydicom.Dataset], ae_title: str = "MODALITY", tls_args: tuple | None = None
            ) -> list[int]:
    """Send datasets to the node over one association as a modality would; the status of each."""
    ae = AE(ae_title=ae_title)
    for sop_class in (CTImageStorage, ComputedRadiographyImageStorage):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title=OUR_AE, tls_args=tls_args)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()
