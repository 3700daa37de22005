"""The whole inference over every image encoding pydicom decodes (tests/dicom_matrix.py): one run over a
folder of all of them. Every input yields all its outputs, every DICOM output passes dciodvfy, and every
lossless encoding of one image gives the same Secondary Capture."""

import hashlib
from collections import defaultdict

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from tests.dicom_matrix import NATIVE, markdown, run_matrix

LOSSLESS = NATIVE + (RLELossless, JPEGLSLossless, JPEG2000Lossless)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return run_matrix(tmp_path_factory.mktemp("photometric_matrix"))


def test_the_matrix_covers_every_interpretation_depth_sign_layout_and_syntax(matrix):
    combinations = [c for c, _ in matrix.rows]
    assert not matrix.missing, "an encoder of the test dependencies is not installed"
    assert {c.photometric for c in combinations} == {"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL",
                                                     "YBR_FULL_422", "YBR_RCT", "YBR_ICT"}
    assert {c.bits_stored for c in combinations} == {8, 12, 16} and {c.signed for c in combinations} == {False, True}
    assert {c.planar for c in combinations} == {0, 1} and {c.frames for c in combinations} == {1, 2}
    assert {c.syntax for c in combinations} == set(LOSSLESS) | {pydicom.uid.JPEGLSNearLossless, pydicom.uid.JPEG2000}


def test_every_input_yields_all_its_outputs(matrix):
    assert matrix.returncode == 0, matrix.log[-3000:]
    incomplete = [path.name for c, path in matrix.rows if not matrix.complete(c, path)]
    assert incomplete == [], markdown(matrix)
    assert "unable to load" not in matrix.log


def test_every_dicom_output_passes_dciodvfy(matrix):
    assert len(matrix.errors) == sum(2 * c.frames + ("pm" in matrix.expected_kinds(c)) for c, _ in matrix.rows)  # SC, SR
    assert {name: errors for name, errors in matrix.errors.items() if errors} == {}


def test_every_lossless_encoding_of_an_image_gives_the_same_secondary_capture(matrix):
    """Native little and big endian, implicit and explicit VR, deflate, RLE, JPEG-LS and JPEG 2000 lossless of
    the same stored values decode to the same image, hence the same prediction and the same SC pixels; the
    RGB image through JPEG 2000's reversible colour transform (YBR_RCT) decodes to the RGB image itself."""
    captures = defaultdict(dict)
    for c, path in matrix.rows:
        if c.syntax in LOSSLESS:
            image = ("RGB" if c.photometric == "YBR_RCT" else c.photometric, c.bits_stored, c.signed, c.planar, c.frames)
            frames = sorted(matrix.records[path.name], key=lambda r: str(r["frame"]))
            captures[image][path.name] = tuple(
                hashlib.sha256(pydicom.dcmread(matrix.out / r["outputs"]["sc"][0]).PixelData).hexdigest() for r in frames)
    assert len(captures) == 38  # 40 lossless images, of which YBR_RCT (1 and 2 frames) is the RGB one
    differing = {image: files for image, files in captures.items() if len(set(files.values())) != 1}
    assert differing == {}
