import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bundle.synthetic import make_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def dataset_2d(tmp_path_factory) -> Path:
    """A tiny 2D synthetic dataset (CR DICOM + NIfTI masks): 24 cases, 64 rows."""
    out = tmp_path_factory.mktemp("synthetic2d")
    make_dataset(out, dims=2, n=24, seed=3, size=64)
    return out


@pytest.fixture(scope="session")
def dataset_3d(tmp_path_factory) -> Path:
    """A tiny 3D synthetic dataset (CT NIfTI + masks): 12 cases of 32 x 32 x 24 voxels."""
    out = tmp_path_factory.mktemp("synthetic3d")
    make_dataset(out, dims=3, n=12, seed=4, size=32)
    return out


def dicom_validation_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy (dicom3tools) prints for a DICOM file."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; `make test` installs it")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def run_bundle(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` with the bundle's metadata and logging config, from the repo root."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--meta_file", "configs/metadata.json",
               "--logging_file", "configs/logging.conf", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
