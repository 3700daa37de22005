"""MLflow's web UI in a real browser: ``mlflow server`` on a loopback port over a store, and Debian's
headless Chromium driven by Selenium through Debian's chromedriver.

The UI is a JavaScript app: pages are read from the rendered DOM once the text a reviewer looks for
has appeared. ``python -m tests.mlflow_ui OUT`` makes a tiny store (as tests/test_mlflow_review.py
does) under OUT and saves the screenshots of docs/README.md into ``docs/images``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Without the background-networking flags Chromium's own connections are refused here and it stalls
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
# MLflow 3's side bar switches between GenAI and model-training views for the whole UI
MODEL_TRAINING = "workflowType=machine_learning"


def browser_missing() -> str | None:
    """Why the browser checks cannot run here, or None."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    return f"{', '.join(missing)} missing (`make test` installs Debian's chromium and chromium-driver)" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store: Path, log: Path, artifacts: Path | None = None):
    """``mlflow server`` over the SQLite store ``store`` on a free loopback port; yields its URL. Runs'
    artifacts are files where their runs say, or with ``artifacts`` stored and served by the server
    under that folder (what a team's shared server does)."""
    port = _free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{store}"]
    if artifacts is not None:
        command += ["--serve-artifacts", "--artifacts-destination", str(artifacts)]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"mlflow server stopped: {log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        else:
            raise RuntimeError(f"mlflow server did not start: {log.read_text()[-3000:]}")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=3)
        except subprocess.TimeoutExpired:  # uvicorn waits for idle keep-alive connections
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@contextlib.contextmanager
def chromium(width: int = 1800, height: int = 1700):
    """Headless Chromium with a fresh profile, driven through chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class Reviewer:
    """What a reviewer does in MLflow's UI at ``url``: open a page, wait for what it shows, expand
    nested runs, and read the page's text."""

    def __init__(self, driver, url: str, timeout: float = 60):
        self.driver, self.url, self.timeout = driver, url, timeout

    def open(self, route: str, *expected: str) -> str:
        """Open ``#/route`` in the model-training views; return the page's text once it shows every
        ``expected`` string."""
        self.driver.get(f"{self.url}/#/{route}{'&' if '?' in route else '?'}{MODEL_TRAINING}")
        text = self.wait_for(*expected)
        self._close_assistant()
        return text

    def wait_for(self, *expected: str) -> str:
        deadline = time.monotonic() + self.timeout
        while True:
            text = self.text()
            missing = [item for item in expected if item not in text]
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.driver.current_url} does not show {missing}; it shows:\n{text[:3000]}")
            time.sleep(0.5)

    def text(self) -> str:
        from selenium.common.exceptions import WebDriverException

        try:
            return self.driver.find_element("tag name", "body").text
        except WebDriverException:  # the page is being replaced
            return ""

    def expand_nested_runs(self, *expected: str) -> str:
        """Click every parent run's expander in the runs list; return the text once ``expected`` shows."""
        for button in self.driver.find_elements("css selector", 'button[data-component-id*="runnamecellrenderer"]'):
            button.click()
        return self.wait_for(*expected)

    def sliders(self) -> set[tuple[str, str]]:
        """The (first, last) step of every step slider on the page (an image chart's, for one)."""
        return {(s.get_attribute("aria-valuemin"), s.get_attribute("aria-valuemax"))
                for s in self.driver.find_elements("css selector", "[role=slider]")}

    def _close_assistant(self) -> None:
        """Close the assistant panel, which would cover part of a screenshot."""
        for button in self.driver.find_elements("css selector", "button[aria-label=Close]"):
            with contextlib.suppress(Exception):
                button.click()

    def screenshot(self, path: Path, settle: float = 2.0) -> Path:
        time.sleep(settle)  # charts animate in
        self.driver.save_screenshot(str(path))
        return path


def main(out: Path, images: Path) -> None:
    """Make the tiny store of tests/test_mlflow_review.py under ``out`` (unless it is there), run its
    browser checks, and copy their screenshots to ``images``."""
    from bundle.synthetic import make_dataset
    from tests import test_mlflow_review as review

    if not (out / "eval" / "mlflow.db").is_file():
        make_dataset(out / "data", dims=2, n=24, seed=3, size=64)
        review.make_review_store(out / "data", out)
    with mlflow_server(out / "eval" / "mlflow.db", out / "server.log") as url, chromium() as driver:
        reviewer = (Reviewer(driver, url), out)
        review.test_in_the_browser_training_runs_sort_by_test_auc_with_evaluations_system_metrics_and_galleries(reviewer)
        review.test_in_the_browser_the_comparison_has_a_child_run_per_method_with_its_metrics(reviewer)
    images.mkdir(parents=True, exist_ok=True)
    for name in ("training_runs", "comparison_runs"):
        shutil.copy(out / f"{name}.png", images / f"mlflow_{name}.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else Path("docs/images"))
