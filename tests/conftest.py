import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

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


@pytest.fixture(scope="session")
def mixed_folder(tmp_path_factory):
    """A folder as a hospital might send it: files, a series, multi-frame, NIfTI and junk."""
    root = tmp_path_factory.mktemp("incoming")
    for name in ("CT_small.dcm", "SC_rgb_rle_2frame.dcm", "JPEG2000.dcm"):
        shutil.copy(get_testdata_file(name), root / name)
    synthetic = tmp_path_factory.mktemp("synthetic3d")
    make_dataset(synthetic, dims=3, n=2, seed=9, size=16, dicom_series=True)
    shutil.copytree(synthetic / "series" / "case_00000", root / "ct_series")
    shutil.copy(synthetic / "images" / "case_00001.nii.gz", root / "volume.nii.gz")
    (root / "notes.txt").write_text("not an image")
    (root / "empty.dcm").write_bytes(b"")
    whole = open(get_testdata_file("CT_small.dcm"), "rb").read()
    (root / "truncated.dcm").write_bytes(whole[:-1000])  # cut inside the pixel data
    (root / "header_only.dcm").write_bytes(whole[:700])  # cut before the pixel data
    report = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del report.PixelData
    report.save_as(root / "no_pixels.dcm")
    mpeg = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    mpeg.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG-2: no decoder exists
    mpeg.PixelData = encapsulate([b"\x00" * 64])
    mpeg.save_as(root / "video.dcm")
    return root


@pytest.fixture(scope="session")
def enhanced_ct(mixed_folder, tmp_path_factory) -> Path:
    """The mixed folder's CT series as one Legacy Converted Enhanced CT file (a volume in one multi-frame file)."""
    import highdicom as hd

    series = [pydicom.dcmread(p) for p in sorted((mixed_folder / "ct_series").iterdir())]
    volume = hd.legacy.LegacyConvertedEnhancedCTImage(
        series, series_instance_uid=generate_uid(entropy_srcs=["enhanced-series"]), series_number=2,
        sop_instance_uid=generate_uid(entropy_srcs=["enhanced-instance"]), instance_number=1,
    )
    path = tmp_path_factory.mktemp("enhanced") / "enhanced_ct.dcm"
    volume.save_as(path)
    return path


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


def save_described_checkpoint(network, path: Path, image_size: int, window=None, class_names=None,
                              model_name: str = "test-model") -> Path:
    """``model.pt`` as the training config's CheckpointSaver writes it: the weights under "model" beside the
    ``bundle.checkpoints.ModelDescription`` under "description" (ignite saves each object's state dict)."""
    import torch

    from bundle.checkpoints import ModelDescription

    description = ModelDescription(network, model_name, image_size, window, class_names or {0: "no lesion", 1: "lesion"},
                                   "0.2.0", {"training": [{"image": "a.dcm", "label": 0}]}, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": network.state_dict(), "description": description.state_dict()}, path)
    return path
