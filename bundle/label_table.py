"""The spreadsheet of labels a hospital team keeps beside a PACS export: read it, find its key column.

A row names images by one key: a file path relative to the images folder, or a SOP, Series or
Study Instance UID, or an accession number. Problems are reported by row number (the header is
row 1, as a spreadsheet shows it), never by the row's values: those are patient identifiers.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

# key kind -> (the DICOM keyword a row's value is compared with, column names recognised for it)
KEYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "path": ("path", ("path", "file", "filename", "filepath", "image", "imagepath", "relativepath")),
    "sop": ("SOPInstanceUID", ("sopinstanceuid", "sopuid", "sop")),
    "series": ("SeriesInstanceUID", ("seriesinstanceuid", "seriesuid")),
    "study": ("StudyInstanceUID", ("studyinstanceuid", "studyuid")),
    "accession": ("AccessionNumber", ("accessionnumber", "accession", "accessionno")),
}
LABEL_COLUMNS = ("label", "class", "target")
PATIENT_COLUMNS = ("patient", "patientid", "patientidentifier")


class LabelTableError(ValueError):
    """The labels file cannot be used at all (missing, no key or label column, no rows)."""


@dataclass(frozen=True)
class LabelRow:
    row: int  # spreadsheet row number: the header is row 1
    key: str  # the path or identifier the row names images by
    label: int
    patient: str | None  # the patient column's value, when the table has one


@dataclass
class LabelTable:
    key_kind: str  # one of KEYS
    key_column: str
    rows: list[LabelRow]
    problems: list[str]  # rows left out, by row number only


def _normalised(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _find_column(header: list[str], wanted: tuple[str, ...]) -> str | None:
    by_name = {_normalised(h): h for h in header}
    return next((by_name[w] for w in wanted if w in by_name), None)


def _parse_label(value: str, classes: list[str] | None) -> int | None:
    value = value.strip()
    if classes:
        return classes.index(value) if value in classes else None
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number.is_integer() and number >= 0 else None


def _sniff_dialect(sample: str) -> type[csv.Dialect] | csv.Dialect:
    try:  # spreadsheets saved in some locales separate by ';' or tabs
        return csv.Sniffer().sniff(sample.splitlines()[0] if sample else "", delimiters=",;\t")
    except csv.Error:
        return csv.excel


def read_label_table(path: str | Path, key: str = "auto", key_column: str | None = None,
                     label_column: str | None = None, patient_column: str | None = None,
                     classes: list[str] | None = None) -> LabelTable:
    """Read a CSV of labels.

    ``key``: "auto" (the first of path, sop, series, study, accession whose column the header has)
    or one of those kinds; ``key_column`` names the column when it has another name. Labels are
    class indices (0, 1, ...) or, with ``classes``, class names (index = position in ``classes``).
    ``patient_column`` (default: a "patient"/"PatientID" column if there is one) groups images of
    one patient that carry no DICOM PatientID (NIfTI files).
    """
    path = Path(path)
    if not path.is_file():
        raise LabelTableError(f"labels file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")  # utf-8-sig: spreadsheets often start with a BOM
    reader = csv.DictReader(text.splitlines(), dialect=_sniff_dialect(text))
    header = [h for h in (reader.fieldnames or []) if h]
    if key != "auto" and key not in KEYS:
        raise LabelTableError(f"unknown key {key!r}; choose auto or one of {sorted(KEYS)}")
    if key_column is not None:
        if key_column not in header:
            raise LabelTableError(f"{path}: no column {key_column!r} (columns: {header})")
        if key == "auto":
            key = next((k for k, (_, names) in KEYS.items() if _normalised(key_column) in names), "")
            if not key:
                raise LabelTableError(f"{path}: say which kind of key column {key_column!r} holds with --key")
    elif key == "auto":
        key = next((k for k, (_, names) in KEYS.items() if _find_column(header, names)), "")
        if not key:
            raise LabelTableError(f"{path}: no key column; expected one of "
                                  f"{[names[0] for _, names in KEYS.values()]} (or pass --key and --key_column)")
        key_column = _find_column(header, KEYS[key][1])
    else:
        key_column = _find_column(header, KEYS[key][1])
        if key_column is None:
            raise LabelTableError(f"{path}: no {KEYS[key][0]} column (columns: {header}); name it with --key_column")
    label_column = label_column or _find_column(header, LABEL_COLUMNS)
    if label_column not in header:
        raise LabelTableError(f"{path}: no label column (columns: {header}); name it with --label_column")
    patient_column = patient_column or _find_column(header, PATIENT_COLUMNS)
    if patient_column is not None and patient_column not in header:
        raise LabelTableError(f"{path}: no column {patient_column!r} (columns: {header})")

    rows, problems = [], []
    for number, record in enumerate(reader, start=2):
        value = (record.get(key_column) or "").strip()
        if not value and not any((v or "").strip() for v in record.values() if isinstance(v, str)):
            continue  # a blank line at the end of a spreadsheet export
        if not value:
            problems.append(f"{path.name} row {number}: empty {key_column}")
            continue
        raw_label = record.get(label_column) or ""
        label = _parse_label(raw_label, classes)
        if label is None:
            problems.append(f"{path.name} row {number}: label {raw_label.strip()!r} is not "
                            + (f"one of the classes {classes}" if classes else "a class index (name classes with --classes)"))
            continue
        patient = (record.get(patient_column) or "").strip() or None if patient_column else None
        rows.append(LabelRow(number, value, label, patient))
    if not rows and not problems:
        raise LabelTableError(f"{path}: no rows")
    return LabelTable(key, key_column, rows, problems)
