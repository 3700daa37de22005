"""DICOMweb with dicomweb-client: a reachability check (QIDO-RS), retrieval (WADO-RS) and storage
(STOW-RS) with the outcome of every instance read from the response.

Sessions verify https certificates (requests' default, or the endpoint's ``ca_bundle``) and carry
HTTP Basic credentials from the environment or a credentials file. Errors name the URL, never a
credential (URLs with user information are refused when the configuration is loaded).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import requests
from dicomweb_client import DICOMwebClient

from bundle.files import atomic_write
from bundle.pacs.config import Endpoint
from bundle.pacs.protocol import PacsError, StoreOutcome, instance_file_name

RETRYABLE_HTTP = {408, 429, 500, 502, 503, 504}


class VerifyingSession(requests.Session):
    """A session whose CA bundle, when one is configured, holds for every request.

    requests lets the environment (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE) replace a session's
    ``verify`` per request, so a configured ``ca_bundle`` would be silently ignored wherever those
    are set. Without a configured bundle requests' own rules apply (the environment's bundle, else
    certifi); verification is never turned off.
    """

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if isinstance(self.verify, str):
            settings["verify"] = self.verify
        return settings


class DicomWebService:
    """One DICOMweb service (``endpoint.dicomweb_url``)."""

    def __init__(self, endpoint: Endpoint, batch_size: int = 20):
        endpoint.require_dicomweb()
        self.endpoint = endpoint
        self.url = endpoint.dicomweb_url.rstrip("/")
        self.batch_size = batch_size
        self._client: DICOMwebClient | None = None

    @property
    def description(self) -> str:
        return f"{self.url} (DICOMweb)"

    @property
    def client(self) -> DICOMwebClient:
        if self._client is None:
            credentials = self.endpoint.credentials()
            session = VerifyingSession()
            if credentials is not None:
                session.auth = (credentials.username, credentials.password)  # HTTP Basic
            session.verify = self.endpoint.ca_bundle or True
            client = DICOMwebClient(self.url, session=session, timeout=self.endpoint.timeout_seconds)
            client.set_http_retry_params(retry=False)  # with_retries does the retrying, for every protocol alike
            self._client = client
        return self._client

    def _error(self, what: str, err: Exception) -> PacsError:
        """A requests failure in words that name the URL and say what to do."""
        if isinstance(err, requests.exceptions.SSLError):
            return PacsError(f"{what}: TLS certificate verification failed for {self.url}; give the CA that signed the "
                             f"server's certificate in the endpoint's ca_bundle ({_innermost(err)})", retryable=False)
        if isinstance(err, requests.HTTPError) and err.response is not None:
            code = err.response.status_code
            if code in (401, 403):
                names = " / ".join(v for v in (self.endpoint.username_env, self.endpoint.password_env) if v)
                return PacsError(f"{what}: {self.url} refused the credentials (HTTP {code} {err.response.reason}); check "
                                 f"the user name and password in {names or 'the environment'} or the credentials file",
                                 retryable=False)
            if code == 404:
                return PacsError(f"{what}: not found at {self.url} (HTTP 404)", retryable=False)
            return PacsError(f"{what}: {self.url} answered HTTP {code} {err.response.reason}", retryable=code in RETRYABLE_HTTP)
        if isinstance(err, requests.Timeout):
            return PacsError(f"{what}: {self.url} did not answer within {self.endpoint.timeout_seconds} s")
        if isinstance(err, requests.ConnectionError):
            return PacsError(f"{what}: cannot connect to {self.url} ({type(_innermost(err)).__name__})")
        return PacsError(f"{what}: {self.url}: {type(err).__name__}", retryable=False)

    def echo(self) -> None:
        """A QIDO-RS search for one study: proves the URL, the credentials and the certificate."""
        try:
            self.client.search_for_studies(limit=1)
        except requests.RequestException as err:
            raise self._error("QIDO-RS", err) from None

    def retrieve(self, study_uid: str, series_uid: str | None, folder: Path) -> int:
        """WADO-RS the study (or one series) into ``folder``, instance by instance as they stream in."""
        folder.mkdir(parents=True, exist_ok=True)
        count = 0
        try:
            if series_uid:
                instances = self.client.iter_series(study_uid, series_uid)
            else:
                instances = self.client.iter_study(study_uid)
            for ds in instances:
                path = folder / instance_file_name(str(ds.SOPInstanceUID))
                with atomic_write(path) as tmp:
                    ds.save_as(tmp, enforce_file_format=True)
                count += 1
        except requests.RequestException as err:
            raise self._error("WADO-RS", err) from None
        if count == 0:
            raise PacsError(f"WADO-RS: no instance of the requested {'series' if series_uid else 'study'} at {self.url}",
                            retryable=False)
        return count

    def store(self, paths: list[Path]) -> dict[Path, StoreOutcome]:
        """STOW-RS in batches; each instance's outcome from the response's Referenced / Failed SOP Sequence."""
        outcomes: dict[Path, StoreOutcome] = {}
        for start in range(0, len(paths), self.batch_size):
            batch = paths[start:start + self.batch_size]
            datasets = {}
            for path in batch:
                ds = pydicom.dcmread(path)
                datasets[str(ds.SOPInstanceUID)] = (path, ds)
            try:
                response = self.client.store_instances([ds for _, ds in datasets.values()])
            except requests.HTTPError as err:
                if err.response is None or err.response.status_code != 409:
                    raise self._error("STOW-RS", err) from None
                response = _stow_response(err.response)  # 409: every instance failed, the body says why
            except requests.RequestException as err:
                raise self._error("STOW-RS", err) from None
            stored = {str(item.ReferencedSOPInstanceUID): item for item in response.get("ReferencedSOPSequence", [])}
            failed = {str(item.ReferencedSOPInstanceUID): item for item in response.get("FailedSOPSequence", [])}
            for uid, (path, _) in datasets.items():
                if uid in stored:
                    warning = stored[uid].get("WarningReason")
                    outcomes[path] = StoreOutcome(True, "stored" + (f" with warning 0x{warning:04X}" if warning else ""))
                elif uid in failed:
                    reason = failed[uid].get("FailureReason")
                    outcomes[path] = StoreOutcome(False, f"failure reason 0x{reason:04X}" if reason is not None else "failed")
                else:
                    outcomes[path] = StoreOutcome(False, "not acknowledged in the STOW-RS response")
        return outcomes


def _stow_response(response: requests.Response) -> pydicom.Dataset:
    try:
        return pydicom.Dataset.from_json(response.json())
    except ValueError:
        return pydicom.Dataset()


def _innermost(err: BaseException) -> BaseException:
    """urllib3 wraps the cause of a failed connection several times; the last one says what happened."""
    while err.__context__ is not None or err.__cause__ is not None:
        err = err.__cause__ or err.__context__
    return err
