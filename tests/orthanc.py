"""A real Orthanc PACS for the PACS tests, started as a plain process on free loopback ports.

Each ``OrthancServer`` has its own configuration, database and storage folder, HTTP Basic
authentication, a checked called AE title, the DICOMweb plugin and the AE titles of the tests'
peers registered (so C-GET, C-MOVE and storage to them are allowed); with ``dicom_tls`` it speaks
DICOM TLS only, requires callers' certificates and uses TLS towards its peers too. ``stop`` kills it by its pid;
``start`` again reuses the same folder and ports, so what it had stored is still there.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
import requests

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "ai", "orthanc-test-secret"


def require_orthanc() -> None:
    """Skip the calling test (module) when Orthanc or its DICOMweb plugin is not installed."""
    missing = [str(p) for p in (ORTHANC, DICOMWEB_PLUGIN) if not p.exists()]
    if missing:
        pytest.skip(f"Orthanc is not installed ({', '.join(missing)} missing): install the Debian packages "
                    "orthanc and orthanc-dicomweb (`make test` does)", allow_module_level=True)


def free_port() -> int:
    """A TCP port nobody listens on now (the OS's choice on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """One Orthanc process: DICOM on ``dicom_port`` with AE title ``ae_title``, REST and DICOMweb on
    ``http_port`` (``url``), user ``USER`` / ``PASSWORD``; ``modalities`` maps a name to
    ``(ae_title, host, port)`` of the peers it may talk to."""

    def __init__(self, folder: Path, ae_title: str, modalities: dict[str, tuple[str, str, int]],
                 lua_script: str | None = None, dicom_tls: tuple[Path, Path, Path] | None = None):
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": ae_title, "StorageDirectory": str(self.folder / "db"), "IndexDirectory": str(self.folder / "db"),
            "DicomAet": ae_title, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
            "DicomCheckCalledAet": True,
            "DicomModalities": {name: {"AET": aet, "Host": host, "Port": port, "UseDicomTls": dicom_tls is not None}
                                for name, (aet, host, port) in modalities.items()},
            "DicomScuTimeout": 5, "DicomAssociationCloseDelay": 0, "SaveJobs": False, "StableAge": 1,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        }
        if dicom_tls:  # DICOM TLS only, for its SCP and for the associations it opens; peers must show a certificate
            certificate, key, trusted = dicom_tls
            config.update(DicomTlsEnabled=True, DicomTlsCertificate=str(certificate), DicomTlsPrivateKey=str(key),
                          DicomTlsTrustedCertificates=str(trusted), DicomTlsRemoteCertificateRequired=True)
        if lua_script:
            (self.folder / "filter.lua").write_text(lua_script)
            config["LuaScripts"] = [str(self.folder / "filter.lua")]
        (self.folder / "orthanc.json").write_text(json.dumps(config, indent=1))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 60) -> OrthancServer:
        log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen([str(ORTHANC), str(self.folder / "orthanc.json")], stdout=log, stderr=log,
                                        cwd=self.folder)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: see {self.folder / 'orthanc.log'}")
            try:
                if self.rest("get", "/system", timeout=1).ok and self._dicom_listening():
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer /system within {timeout} s: see {self.folder / 'orthanc.log'}")

    def _dicom_listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.dicom_port)) == 0

    def stop(self) -> None:
        """Kill the process by its pid and wait for it (SIGTERM, SIGKILL after 10 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def rest(self, method: str, path: str, **kwargs) -> requests.Response:
        """A call to Orthanc's REST API with the test user's credentials."""
        kwargs.setdefault("timeout", 30)
        return requests.request(method, self.url + path, auth=(USER, PASSWORD), **kwargs)

    def upload(self, paths) -> None:
        for path in paths:
            self.rest("post", "/instances", data=Path(path).read_bytes()).raise_for_status()

    def datasets_of_study(self, study_uid: str) -> list[pydicom.Dataset]:
        """Every instance Orthanc holds in the study, as the DICOM file it stored."""
        found = self.rest("post", "/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}})
        found.raise_for_status()
        return [pydicom.dcmread(io.BytesIO(self.rest("get", f"/instances/{i}/file").content)) for i in found.json()]

    def instance_count(self) -> int:
        return self.rest("get", "/statistics").json()["CountInstances"]


class TlsTerminator:
    """https on a free loopback port in front of an http server, as a reverse proxy (nginx, a load
    balancer) puts it in front of a PACS. Orthanc 1.10.1's own ``SslEnabled`` crashes (SIGSEGV) on
    the first https connection on Debian 12, so the https tests go through this instead.

    Hand-written because no maintained library in the environment terminates TLS: it accepts TLS
    with ``certificate`` / ``key`` and copies bytes both ways to ``127.0.0.1:backend_port``.
    """

    def __init__(self, certificate: Path, key: Path, backend_port: int):
        self.backend_port = backend_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certificate, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            secure = self.context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):  # the client refused our certificate: what the test expects
            client.close()
            return
        backend = socket.create_connection(("127.0.0.1", self.backend_port))
        threading.Thread(target=_pipe, args=(backend, secure), daemon=True).start()
        _pipe(secure, backend)

    def close(self) -> None:
        self._closed.set()
        self.listener.close()


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, target):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
