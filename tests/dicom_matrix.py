"""Every image encoding pydicom decodes, as tiny DICOM files: the photometric interpretation matrix.

Rows are the valid combinations of photometric interpretation, bit depth, signedness, planar
configuration, frame count and transfer syntax. Validity follows PS3.3 C.7.6.3 for native pixel
data (colour is unsigned; YBR_FULL_422 is 8-bit and interleaved) and, for compressed syntaxes,
PS3.5 Section 8.2 as pydicom encodes it (``ENCODING_PROFILES``); a combination whose encoder
is not installed is left out and listed. Sources are ultrasound (single and multi-frame), CT
and MR (with a plane, so a Parametric Map applies), CR, Secondary Capture (single and
multi-frame) and visible-light photographs, chosen by colour and frame count (the same for every
transfer syntax of one image, so their outputs can be compared); the sources are test inputs, not
checked against their IODs.

``python tests/dicom_matrix.py <work folder>`` writes the files, runs configs/inference.json over
them with a tiny untrained 2D model, checks every DICOM output with dciodvfy and prints the matrix
as docs/README.md shows it (tests/test_photometric_matrix.py asserts the same run).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.pixels import convert_color_space, get_encoder
from pydicom.pixels.encoders.base import ENCODING_PROFILES
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

SIDE = 32  # OpenJPEG encodes six wavelet resolutions: at least 32 pixels a side
NATIVE = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)
COMPRESSED = (RLELossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000)
DICOM_KINDS = ("sc", "pm", "sr")  # the outputs that are DICOM files, checked with dciodvfy
PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")
# SOP classes by (colour, multi-frame); the rows cycle through them
SOP_CLASSES = {
    (False, False): ["CT", "US", "MR", "CR", "SC"],
    (False, True): ["US-MF", "SC-MF-GREY"],
    (True, False): ["US", "VL", "SC"],
    (True, True): ["US-MF", "SC-MF-COLOUR"],
}
SOP_CLASS_UIDS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4", "CR": "1.2.840.10008.5.1.4.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1", "US-MF": "1.2.840.10008.5.1.4.1.1.3.1", "SC": "1.2.840.10008.5.1.4.1.1.7",
    "SC-MF-GREY-8": "1.2.840.10008.5.1.4.1.1.7.2", "SC-MF-GREY-16": "1.2.840.10008.5.1.4.1.1.7.3",
    "SC-MF-COLOUR": "1.2.840.10008.5.1.4.1.1.7.4", "VL": "1.2.840.10008.5.1.4.1.1.77.1.4",
}
MODALITIES = {"CT": "CT", "MR": "MR", "CR": "CR", "US": "US", "US-MF": "US", "SC": "OT", "SC-MF-GREY": "OT",
              "SC-MF-COLOUR": "OT", "VL": "XC"}


@dataclass(frozen=True)
class Combination:
    photometric: str
    bits_stored: int  # 8, 12 (in 16 allocated) or 16
    signed: bool
    planar: int  # PlanarConfiguration of colour data; 0 for one sample
    frames: int
    syntax: UID

    @property
    def samples(self) -> int:
        return 1 if self.photometric in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR") else 3

    @property
    def bits_allocated(self) -> int:
        return 8 if self.bits_stored == 8 else 16

    @property
    def name(self) -> str:
        sign = "s" if self.signed else "u"
        planar = f"_planar{self.planar}" if self.samples == 3 else ""
        photometric = self.photometric.replace(" ", "_")
        return f"{photometric}_{self.bits_stored}{sign}{planar}_{self.frames}f_{self.syntax.keyword}"


def _valid(c: Combination) -> bool:
    colour = c.photometric not in ("MONOCHROME1", "MONOCHROME2")
    if colour and c.signed:
        return False  # PS3.3 C.7.6.3.1.4: colour data is unsigned
    if c.samples == 3 and c.bits_stored != 8:
        return False  # the IODs here (US, SC true colour, VL) hold 8-bit colour only
    if c.photometric == "PALETTE COLOR" and c.bits_stored == 12:
        return False
    if c.syntax in NATIVE:
        # YBR_RCT / YBR_ICT exist only inside JPEG 2000; YBR_FULL_422 is interleaved (planar 0)
        return c.photometric not in ("YBR_RCT", "YBR_ICT") and not (c.photometric == "YBR_FULL_422" and c.planar)
    if c.planar:
        return False  # compressed colour frames are encoded pixel-interleaved
    return any(pi == c.photometric and spp == c.samples and int(c.signed) in rep and c.bits_allocated in alloc
               and c.bits_stored in stored for pi, spp, rep, alloc, stored in ENCODING_PROFILES.get(c.syntax, []))


def combinations() -> tuple[list[Combination], list[Combination]]:
    """(rows whose encoder is installed, valid rows left out because it is not)."""
    rows, missing = [], []
    for pi, bits, signed, planar, frames, syntax in itertools.product(
            PHOTOMETRIC, (8, 12, 16), (False, True), (0, 1), (1, 2), NATIVE + COMPRESSED):
        c = Combination(pi, bits, signed, planar if pi not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR") else 0,
                        frames, syntax)
        if c.samples == 1 and planar:
            continue
        if not _valid(c):
            continue
        available = syntax in NATIVE or get_encoder(syntax).is_available
        (rows if available else missing).append(c)
    return rows, missing


def _rgb(frames: int) -> np.ndarray:
    """(frames, SIDE, SIDE, 3) uint8 RGB: ramps in red and green, a bright square in blue."""
    yy, xx = np.mgrid[:SIDE, :SIDE]
    frame = np.stack([xx * 255 // (SIDE - 1), yy * 255 // (SIDE - 1), np.zeros_like(xx)], axis=-1).astype(np.uint8)
    frame[4:10, 6:12, 2] = 220
    return np.stack([np.roll(frame, 2 * f, axis=1) for f in range(frames)])


def _grey(c: Combination) -> np.ndarray:
    """(frames, SIDE, SIDE) over the whole stored range (negative values when signed)."""
    yy, xx = np.mgrid[:SIDE, :SIDE]
    top = 2 ** (c.bits_stored - 1) - 1 if c.signed else 2**c.bits_stored - 1
    bottom = -(2 ** (c.bits_stored - 1)) if c.signed else 0
    if c.syntax == JPEGLSNearLossless:
        top, bottom = top - 2, bottom + 2  # lossy JPEG-LS needs room for its error bound at both ends
    ramp = bottom + (xx + SIDE * yy) * (top - bottom) // (SIDE * SIDE - 1)
    ramp[5:11, 5:11] = top
    dtype = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16, (16, True): np.int16}[
        (c.bits_allocated, c.signed)]
    return np.stack([np.roll(ramp, f, axis=0) for f in range(c.frames)]).astype(dtype)


def _ybr_422(rgb: np.ndarray) -> bytes:
    """YBR_FULL_422 native bytes of (frames, rows, cols, 3) RGB: Y1 Y2 Cb Cr per pair of pixels (PS3.3 C.7.6.3.1.2)."""
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.int32)
    pairs = ybr.reshape(*ybr.shape[:2], ybr.shape[2] // 2, 2, 3)
    y = pairs[..., 0]
    chroma = pairs[..., 1:].mean(axis=-2).round().astype(np.int32)  # Cb, Cr averaged over the pair
    return np.concatenate([y, chroma], axis=-1).astype(np.uint8).tobytes()


def _palette(ds: pydicom.Dataset, c: Combination) -> None:
    entries = 256 if c.bits_stored == 8 else 4096
    ramp = np.linspace(0, 65535, entries).astype(np.uint16)
    for colour, table in (("Red", ramp), ("Green", ramp[::-1].copy()), ("Blue", np.roll(ramp, entries // 2))):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [entries, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", table.tobytes())


def _sop(c: Combination) -> str:
    """The SOP class of the image (the same for every transfer syntax of it, so their outputs compare)."""
    choices = SOP_CLASSES[(c.samples == 3 or c.photometric == "PALETTE COLOR", c.frames > 1)]
    if c.photometric == "MONOCHROME1":
        choices = [sop for sop in choices if not sop.startswith("US")]  # ultrasound is never MONOCHROME1
    image = (c.photometric, c.bits_stored, c.signed, c.planar, c.frames)
    sop = choices[zlib.crc32(repr(image).encode()) % len(choices)]
    if c.photometric == "PALETTE COLOR" and sop in ("VL", "SC-MF-COLOUR"):
        sop = "US" if c.frames == 1 else "US-MF"  # palette colour is an ultrasound thing
    return sop


def make_source(c: Combination, row: int, study_uid: str) -> pydicom.Dataset:
    """The dataset of one row, encoded in its transfer syntax."""
    sop = _sop(c)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = SOP_CLASS_UIDS[f"{sop}-{c.bits_allocated}" if sop == "SC-MF-GREY" else sop]
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["matrix", c.name])
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["matrix-series", sop])
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Matrix^Test", "MATRIX-1", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240101", "120000", "A1", "1"
    ds.ReferringPhysicianName, ds.Manufacturer = "", "pydicom"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = MODALITIES[sop], 1, row + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if sop in ("CT", "MR"):
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["matrix-frame-of-reference"])
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 1.0
        ds.RescaleIntercept, ds.RescaleSlope = (-1024 if sop == "CT" and not c.signed else 0), 1
    ds.Rows = ds.Columns = SIDE
    ds.SamplesPerPixel = c.samples
    ds.PhotometricInterpretation = c.photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = c.bits_allocated, c.bits_stored, c.bits_stored - 1
    ds.PixelRepresentation = int(c.signed)
    if c.samples == 3:
        ds.PlanarConfiguration = c.planar
    if c.frames > 1 or sop.endswith("MF") or "-MF-" in sop:
        ds.NumberOfFrames = c.frames
        ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime") if sop == "US-MF" else pydicom.tag.Tag("FrameTime")
        ds.FrameTime = 33.3
    if c.photometric == "PALETTE COLOR":
        _palette(ds, c)
    if c.samples == 3:
        source = _rgb(c.frames)
        if c.photometric in ("YBR_FULL", "YBR_FULL_422"):
            source = convert_color_space(source, "RGB", "YBR_FULL")
    else:
        source = _grey(c)
    _encode(ds, c, source)
    return ds


def _encode(ds: pydicom.Dataset, c: Combination, source: np.ndarray) -> None:
    """Set PixelData (native) or compress it into ``c.syntax``; ``source`` is (frames, rows, cols[, 3])."""
    array = source if c.frames > 1 else source[0]
    if c.syntax in NATIVE:
        ds.file_meta.TransferSyntaxUID = c.syntax
        if c.photometric == "YBR_FULL_422":
            data = _ybr_422(_rgb(c.frames))
        else:
            values = np.moveaxis(source, -1, 1) if c.samples == 3 and c.planar else source  # planes R, G, B
            order = ">" if c.syntax == ExplicitVRBigEndian else "<"
            data = values.astype(values.dtype.newbyteorder(order)).tobytes()
        ds.PixelData = data + b"\x00" * (len(data) % 2)
        ds["PixelData"].VR = "OB" if c.bits_allocated == 8 else "OW"
        return
    options = {}
    if c.syntax == JPEGLSNearLossless:
        options["jls_error"] = 2
    if c.syntax == JPEG2000:
        options["j2k_cr"] = [2]
    if c.photometric == "YBR_FULL":
        options["use_mct"] = False  # the data is YBR already: no component transform
    if c.photometric in ("YBR_RCT", "YBR_ICT"):
        array = _rgb(c.frames) if c.frames > 1 else _rgb(1)[0]  # RGB in, the encoder's transform makes it YBR
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.compress(c.syntax, array, generate_instance_uid=False, **options)


def without_preamble(ds: pydicom.Dataset) -> bytes:
    """The dataset alone, explicit VR little endian, as older systems wrote files: no preamble, no "DICM",
    no file meta."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def write_matrix(folder: Path) -> tuple[list[tuple[Combination, Path]], list[Combination]]:
    """Write every row into ``folder``; return (combination, path) of each and the rows left out."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, missing = combinations()
    study = generate_uid(entropy_srcs=["matrix-study"])
    written = []
    for i, c in enumerate(rows):
        ds = make_source(c, i, study)
        path = folder / f"{c.name}.dcm"
        ds.save_as(path, enforce_file_format=True, little_endian=c.syntax != ExplicitVRBigEndian,
                   implicit_vr=c.syntax == ImplicitVRLittleEndian)
        written.append((c, path))
    return written, missing


@dataclass
class MatrixRun:
    """One inference run over the matrix: per file its combination, its records in predictions.json and
    the dciodvfy errors of its DICOM outputs."""

    rows: list[tuple[Combination, Path]]
    missing: list[Combination]
    out: Path
    returncode: int
    log: str
    seconds: float
    records: dict[str, list[dict]] = field(default_factory=dict)  # file name -> its inputs' records
    errors: dict[str, list[str]] = field(default_factory=dict)  # DICOM output -> dciodvfy errors

    def expected_kinds(self, c: Combination) -> set[str]:
        """Every frame is an input with a NIfTI map, an overlay, a Secondary Capture and a Structured Report;
        a single-frame CT or MR image (a Frame of Reference, an image plane) also gets a Parametric Map."""
        return {"nifti", "png", "sc", "sr"} | ({"pm"} if c.frames == 1 and _sop(c) in ("CT", "MR") else set())

    def complete(self, c: Combination, path: Path) -> bool:
        records = self.records.get(path.name, [])
        return len(records) == c.frames and all(
            set(r["outputs"]) == self.expected_kinds(c) and all(len(v) == 1 for v in r["outputs"].values())
            for r in records)

    def valid(self, path: Path) -> bool:
        return all(not self.errors[name] for r in self.records.get(path.name, []) for kind in DICOM_KINDS
                   for name in r["outputs"].get(kind, []))


def run_matrix(work: Path, threads: int = 2) -> MatrixRun:
    """Write the matrix into ``work/in``, run the bundle's inference over it into ``work/out`` and check
    every DICOM output with dciodvfy (``threads`` at a time)."""
    import torch

    from bundle.networks import classifier
    from tests.conftest import dicom_validation_errors, run_bundle

    rows, missing = write_matrix(work / "in")
    torch.manual_seed(0)
    torch.save(classifier("resnet10", backbone_kwargs={"widen_factor": 0.125}).state_dict(), work / "model.pt")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    start = time.perf_counter()
    result = run_bundle("--config_file", "configs/inference.json", "--input_dir", str(work / "in"), "--output_dir",
                        str(work / "out"), "--ckpt_path", str(work / "model.pt"), "--backbone", "resnet10",
                        "--backbone_kwargs", "{'widen_factor': 0.125}", "--image_size", "32",
                        "--inference_tracking", "$None", env=env, timeout=1200)
    run = MatrixRun(rows, missing, work / "out", result.returncode, result.stdout + result.stderr,
                    time.perf_counter() - start)
    if (work / "out" / "predictions.json").exists():
        for record in json.loads((work / "out" / "predictions.json").read_text()):
            run.records.setdefault(Path(record["input"]).name, []).append(record)
    outputs = [name for records in run.records.values() for r in records for kind in DICOM_KINDS
               for name in r["outputs"].get(kind, [])]
    with ThreadPoolExecutor(threads) as pool:
        run.errors = dict(zip(outputs, pool.map(lambda name: dicom_validation_errors(work / "out" / name), outputs)))
    return run


def markdown(run: MatrixRun) -> str:
    """The matrix as a table: a row per image encoding, a column per transfer syntax; a cell counts the
    frame-count variants (1 and 2 frames) whose every input yielded all its outputs, each passing dciodvfy."""
    syntaxes = list(NATIVE + COMPRESSED)
    table: dict[tuple, dict[UID, list[int]]] = {}
    for c, path in run.rows:
        row = (c.photometric, c.bits_stored, "signed" if c.signed else "unsigned", c.planar if c.samples == 3 else "")
        cell = table.setdefault(row, {}).setdefault(c.syntax, [0, 0])
        cell[0] += run.complete(c, path) and run.valid(path)
        cell[1] += 1
    lines = ["| photometric | bits | sign | planar | " + " | ".join(s.keyword.removesuffix("ImageCompression")
                                                                 for s in syntaxes) + " |",
             "| --- " * (4 + len(syntaxes)) + "|"]
    for row, cells in table.items():
        lines.append("| " + " | ".join(str(v) for v in row) + " | "
                     + " | ".join(f"{cells[s][0]}/{cells[s][1]}" if s in cells else "-" for s in syntaxes) + " |")
    kinds: dict[str, int] = {}
    for records in run.records.values():
        for r in records:
            for kind, names in r["outputs"].items():
                kinds[kind] = kinds.get(kind, 0) + len(names)
    inputs = sum(c.frames for c, _ in run.rows)
    errors = sum(len(e) for e in run.errors.values())
    lines += ["", f"{len(run.rows)} files ({len(run.missing)} valid combinations left out: no encoder installed), "
              f"{inputs} inputs (one per frame), {sum(len(r) for r in run.records.values())} predicted;",
              "outputs: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
              + f"; dciodvfy: {len(run.errors)} DICOM files checked, {errors} errors"
              + f" ({sum(1 for e in run.errors.values() if e)} files with errors); inference run {run.seconds:.0f} s."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(markdown(run_matrix(Path(sys.argv[1]))))
