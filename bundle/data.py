"""Decathlon-style datalists: load them and check every file before training starts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import pydicom
from pydicom.pixels import get_decoder
from pydicom.uid import DeflatedExplicitVRLittleEndian

from bundle.privacy import redact
from transforms.dicom import PIXEL_KEYWORDS, read_dicom
from transforms.readers import NIFTI_SUFFIXES

SPLITS = ("training", "validation", "test")


class DatalistError(SystemExit):
    """A datalist names files that are missing or unreadable.

    A SystemExit, so that ``python -m monai.bundle run`` ends with this message and status 1
    instead of a traceback through the config machinery (which wraps every ``Exception``).
    """

    def __init__(self, problems: list[str], datalist: Path):
        self.problems = problems
        super().__init__(f"{datalist}: {len(problems)} entries cannot be used:\n  " + "\n  ".join(problems))


def dicom_problem(ds: pydicom.Dataset, file_size: int | None = None) -> str | None:
    """Why the pixels of a DICOM dataset read with ``defer_size`` cannot be used, or None.

    With ``file_size``, pixel data that would run past the end of the file is reported as truncated.
    """
    present = [k for k in PIXEL_KEYWORDS if k in ds]
    if not present:
        kind = getattr(ds.get("SOPClassUID"), "name", "")
        return "DICOM file holds no pixel data" + (f" ({kind})" if kind else "")
    raw = ds.get_item(present[0], keep_deferred=True)
    tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
    syntax = getattr(ds, "file_meta", pydicom.Dataset()).get("TransferSyntaxUID")
    deflated = syntax == DeflatedExplicitVRLittleEndian  # offsets count the inflated stream, not the file
    if file_size is not None and not deflated and tell is not None and length not in (None, 0xFFFFFFFF) \
            and tell + length > file_size:
        return f"file is truncated ({file_size} bytes, pixel data needs {tell + length})"
    if not int(ds.get("Rows", 0)) or not int(ds.get("Columns", 0)):
        return "image has a zero-size axis"
    if syntax is not None and syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            return f"unsupported transfer syntax {syntax.name} ({syntax})"
        if not available:
            return f"no decoder installed for transfer syntax {syntax.name}"
    return None


def image_problem(path: Path) -> str | None:
    """Why the image at ``path`` (DICOM file, DICOM series folder or NIfTI) cannot be read, or None.

    Reads headers only (pixel data stays on disk), so checking a whole dataset is cheap.
    """
    path = Path(path)
    if not path.exists():
        return "file not found"
    if path.is_dir():
        checked = [(f, dicom_header(f)) for f in sorted(path.iterdir()) if f.is_file()]
        # the reader stacks the folder's DICOM images and skips other files (README, DICOMDIR, reports)
        dicom = [(f, problem) for f, (_, problem) in checked
                 if not (problem or "").startswith(("not a readable DICOM", "DICOM file holds no pixel data"))]
        if not dicom:
            return "folder holds no DICOM file"
        return next((f"{f.name}: {problem}" for f, problem in dicom if problem), None)
    if path.stat().st_size == 0:
        return "file is empty"
    if path.name.endswith(NIFTI_SUFFIXES):
        try:
            header = nib.load(path).header
            return None if all(d > 0 for d in header.get_data_shape()) else "image has a zero-size axis"
        except Exception as err:  # nibabel raises many types for bad files
            return f"not a readable NIfTI file ({type(err).__name__}: {redact(str(err))})"
    return dicom_header(path)[1]


def dicom_header(path: Path, unreadable: str = "not a readable DICOM file") -> tuple[pydicom.Dataset | None, str | None]:
    """The header of a DICOM file (pixel data left on disk) and None, or None and why it cannot be used.

    ``unreadable`` starts the reason given when the file is not DICOM at all.
    """
    size = path.stat().st_size
    if size == 0:
        return None, "file is empty"
    try:
        # defer_size keeps the pixel data unread but its presence visible: a cheap, complete header check;
        # read_dicom also reads files without the 128-byte preamble
        ds = read_dicom(path, defer_size="1 KB")
    except Exception as err:  # pydicom raises InvalidDicomError, EOFError, ValueError, ...
        return None, f"{unreadable} ({type(err).__name__}: {redact(str(err))})"
    problem = dicom_problem(ds, size)
    return (None, problem) if problem else (ds, None)


def load_datalist(dataset_dir: str | Path, filename: str = "datalist.json", num_classes: int | None = None) -> dict:
    """Read ``dataset_dir/filename`` and check every entry of every split.

    Returns ``{"training": [...], "validation": [...], "test": [...]}`` with paths made absolute.
    Raises ``DatalistError`` listing each entry whose image or mask is missing or unreadable, or
    whose label is not an integer class (in ``[0, num_classes)`` when given).
    """
    dataset_dir = Path(dataset_dir).expanduser().resolve()
    datalist_path = dataset_dir / filename
    if not datalist_path.is_file():
        raise DatalistError([f"datalist not found (expected {filename} in {dataset_dir})"], datalist_path)
    try:
        raw = json.loads(datalist_path.read_text())
    except json.JSONDecodeError as err:
        raise DatalistError([f"not valid JSON: {err}"], datalist_path) from None
    problems: list[str] = []
    datalist: dict[str, list[dict]] = {}
    for split in SPLITS:
        entries = raw.get(split, [])
        datalist[split] = []
        for i, entry in enumerate(entries):
            where = f"{split}[{i}]"
            if not isinstance(entry, dict) or "image" not in entry:
                problems.append(f"{where}: entry has no 'image'")
                continue
            label = entry.get("label")
            if not isinstance(label, int) or isinstance(label, bool) or label < 0 or (
                num_classes is not None and label >= num_classes
            ):
                problems.append(f"{where} {entry['image']}: label {label!r} is not a class index"
                                + (f" in [0, {num_classes})" if num_classes else ""))
            item = dict(entry)
            for key in ("image", "mask"):
                if key in entry:
                    item[key] = str(dataset_dir / entry[key])
                    problem = image_problem(Path(item[key]))
                    if problem:
                        problems.append(f"{where} {key} {entry[key]}: {problem}")
            datalist[split].append(item)
    if not datalist["training"] and not datalist["test"]:
        problems.append("no 'training' or 'test' entries")
    if problems:
        raise DatalistError(problems, datalist_path)
    return datalist


def _relative(value, root: Path | None):
    if root is None or not isinstance(value, str):
        return value
    path = Path(value)
    return str(path.relative_to(root)) if path.is_absolute() and path.is_relative_to(root) else value


def datalist_digest(datalist: dict, dataset_dir: str | Path | None = None) -> str:
    """The first 32 hex digits of the SHA-256 of a datalist (as ``load_datalist`` returns it), with its
    paths taken relative to ``dataset_dir``: the same lists give the same digest wherever the data
    lies, and the digest says which data a model saw without naming a file."""
    root = Path(dataset_dir).expanduser().resolve() if dataset_dir is not None else None
    canonical = {split: [{k: _relative(v, root) for k, v in sorted(item.items())} for item in items]
                 for split, items in sorted(datalist.items())}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, default=str).encode()).hexdigest()[:32]


def label_counts(datalist: dict) -> list[tuple[str, int, int]]:
    """(split, label, number of entries) for every split and label of a datalist, sorted: its sizes
    without a path or an identifier."""
    counts: dict[tuple[str, int], int] = {}
    for split, items in datalist.items():
        for item in items:
            key = (split, int(item["label"]))
            counts[key] = counts.get(key, 0) + 1
    return sorted((split, label, n) for (split, label), n in counts.items())
