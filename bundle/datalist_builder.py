"""From a PACS export and a spreadsheet of labels to a Decathlon-style datalist.

The images folder is walked as inference walks its input folder (``bundle.inputs``): each entry
is a DICOM file, a DICOM series folder, a multi-frame DICOM file or a NIfTI file. Rows of the
labels table name entries by path or identifier (``bundle.label_table``); masks are matched to
entries by name (``match_masks``); patients keep all their images in one split (``bundle.splits``).

Everything the user must act on is reported by file path (relative to its folder) or by table
row number; identifiers (patient IDs, UIDs, accession numbers) are compared, never printed.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from bundle.data import NIFTI_SUFFIXES
from bundle.inputs import discover_inputs
from bundle.label_table import KEYS, LabelTable
from bundle.splits import SPLITS, grouped_stratified_split, patient_groups

IMAGE_SUFFIXES = NIFTI_SUFFIXES + (".dcm", ".dicom", ".ima")
IDENTIFIER_TAGS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "AccessionNumber"]


@dataclass(frozen=True)
class ExportImage:
    """One datalist entry found in the export: a file, or a series folder (``name`` ends with "/")."""

    path: Path
    name: str  # relative to the images folder, "/"-separated
    kind: str  # as bundle.inputs: "nifti", "dicom", "dicom-series", "dicom-multiframe"
    files: tuple[Path, ...]  # the DICOM files whose headers identify it (none for NIfTI)


@dataclass
class DatalistBuild:
    datalist: dict[str, list[dict]]
    findings: list[str] = field(default_factory=list)  # each unmatched row, image, mask and skipped file
    summary: list[str] = field(default_factory=list)


def relative_name(path: Path, root: Path) -> str:
    name = path.relative_to(root).as_posix()
    return name + "/" if path.is_dir() else name


def without_suffix(name: str) -> str:
    """``a/b.nii.gz`` -> ``a/b``; ``a/series/`` -> ``a/series``; a UID-named file keeps its dots."""
    name = name.rstrip("/")
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _dicom_children(folder: Path) -> set[Path]:
    # the files MONAI's PydicomReader stacks when it is given this folder
    return {p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and pydicom.misc.is_dicom(p)}


def find_export_images(images_dir: Path, spatial_dims: int,
                       exclude: tuple[Path, ...] = ()) -> tuple[list[ExportImage], list[str]]:
    """Every usable datalist entry under ``images_dir`` and, by file, why others cannot be one.

    ``exclude``: files and folders that are not images even when inside (the labels, the masks).
    """
    inputs, failures = discover_inputs(images_dir, spatial_dims)
    excluded = lambda p: any(p == e or e in p.parents for e in exclude)  # noqa: E731
    inputs = [i for i in inputs if not excluded(i.files[0])]
    failures = [f for f in failures if not excluded(f.path)]
    skipped = [f"skipped {relative_name(f.path, images_dir)}: {f.reason}" for f in failures]
    images: list[ExportImage] = []
    multiframe_2d = sorted({i.files[0] for i in inputs if i.kind == "dicom-frame"})
    skipped += [f"skipped {relative_name(p, images_dir)}: multi-frame file; a 2D datalist entry cannot name one "
                "frame (--spatial_dims 3 takes it as a volume)" for p in multiframe_2d]
    for item in inputs:
        if item.kind == "dicom-frame":
            continue
        if item.kind != "dicom-series":
            images.append(ExportImage(item.files[0], relative_name(item.files[0], images_dir), item.kind,
                                      () if item.kind == "nifti" else item.files))
            continue
        folders = sorted({f.parent for f in item.files})
        folder = folders[0]
        if len(folders) > 1:
            skipped.append(f"skipped the series in {', '.join(relative_name(f, images_dir) for f in folders)}: "
                           "it is spread over several folders; a series entry is one folder")
        elif _dicom_children(folder) != set(item.files):
            skipped.append(f"skipped the series in {relative_name(folder, images_dir)}: the folder holds other DICOM "
                           "files too; a series entry is a folder of its own")
        else:
            images.append(ExportImage(folder, relative_name(folder, images_dir), item.kind, item.files))
    return sorted(images, key=lambda i: i.name), sorted(set(skipped))  # a folder of two series: one line


def read_identifiers(image: ExportImage, all_instances: bool) -> dict[str, set[str]]:
    """DICOM keyword -> values for the image's files (headers only, pixel data not read).

    Series, study, accession and patient come from the first file; ``all_instances`` reads every
    file of a series for its SOP Instance UIDs.
    """
    values: dict[str, set[str]] = defaultdict(set)
    for f in image.files if all_instances else image.files[:1]:
        ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=IDENTIFIER_TAGS)
        for keyword in IDENTIFIER_TAGS:
            value = str(ds.get(keyword, "") or "").strip()
            if value:
                values[keyword].add(value)
    return values


def _path_key(value: str, images_dir: Path) -> str:
    value = value.replace("\\", "/")
    if Path(value).is_absolute():
        try:
            value = Path(value).resolve().relative_to(images_dir).as_posix()
        except ValueError:
            pass
    while value.startswith("./"):
        value = value[2:]
    return value.rstrip("/")


def match_rows(table: LabelTable, images: list[ExportImage], identifiers: dict[str, dict[str, set[str]]],
               images_dir: Path, table_name: str) -> tuple[dict[str, int], dict[str, set[str]], list[str]]:
    """Labels of the images the table's rows name, the rows' patient values per image, and findings."""
    keyword = KEYS[table.key_kind][0]
    index: dict[str, list[str]] = defaultdict(list)
    for image in images:
        keys = {image.name.rstrip("/")} if table.key_kind == "path" else identifiers[image.name].get(keyword, set())
        for key in keys:
            index[key].append(image.name)
    rows_of: dict[str, list] = defaultdict(list)
    findings = []
    for row in table.rows:
        key = _path_key(row.key, images_dir) if table.key_kind == "path" else row.key
        if key not in index:
            findings.append(f"{table_name} row {row.row}: matches no image (by {table.key_column})")
        for name in index.get(key, []):
            rows_of[name].append(row)
    labels, patients = {}, defaultdict(set)
    for image in images:
        rows = rows_of.get(image.name, [])
        distinct = sorted({r.label for r in rows})
        if not rows:
            findings.append(f"unlabelled {image.name}: no row of {table_name} names it")
        elif len(distinct) > 1:
            findings.append(f"left out {image.name}: {table_name} rows {', '.join(str(r.row) for r in rows)} "
                            f"give it different labels {distinct}")
        else:
            labels[image.name] = distinct[0]
            patients[image.name] = {r.patient for r in rows if r.patient}
    return labels, patients, findings


def match_masks(masks_dir: Path, images: list[ExportImage],
                identifiers: dict[str, dict[str, set[str]]]) -> tuple[dict[str, Path], list[str]]:
    """Each image's mask, by the first rule that names exactly one image:

    1. the mask's path relative to ``masks_dir`` without its suffix equals the image's (a series:
       its folder's) relative path without suffix: ``masks/a/b.nii.gz`` <-> ``images/a/b.dcm``;
    2. the mask's file name without suffix is the image's SOP Instance UID (single and multi-frame
       files) or its Series Instance UID (series folders, multi-frame files, a series of one file);
    3. the mask's file name without suffix equals the image's (file or folder) name without suffix.
    A mask that names several images, or an image named by several masks, is reported and left out.
    """
    series_count = Counter(uid for i in images for uid in identifiers[i.name].get("SeriesInstanceUID", ()))
    by_path, by_uid, by_stem = defaultdict(list), defaultdict(list), defaultdict(list)
    for image in images:
        by_path[without_suffix(image.name)].append(image.name)
        by_stem[without_suffix(image.name).rsplit("/", 1)[-1]].append(image.name)
        ids = identifiers[image.name]
        uids = set(ids.get("SOPInstanceUID", ())) if image.kind != "dicom-series" else set()
        uids |= {u for u in ids.get("SeriesInstanceUID", ()) if image.kind != "dicom" or series_count[u] == 1}
        for uid in uids:
            by_uid[uid].append(image.name)
    masks_of: dict[str, list[Path]] = defaultdict(list)
    findings = []
    mask_files = sorted(p for p in masks_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    for mask in mask_files:
        name = relative_name(mask, masks_dir)
        stem = without_suffix(mask.name)
        for rule, candidates in (("path", by_path.get(without_suffix(name), [])), ("UID", by_uid.get(stem, [])),
                                 ("file name", by_stem.get(stem, []))):
            if len(candidates) == 1:
                masks_of[candidates[0]].append(mask)
                break
            if len(candidates) > 1:
                findings.append(f"mask {name} left out: its {rule} matches {len(candidates)} images")
                break
        else:
            findings.append(f"mask {name} matches no image")
    chosen = {}
    for image_name, masks in sorted(masks_of.items()):
        if len(masks) > 1:
            findings.append(f"masks {', '.join(relative_name(m, masks_dir) for m in masks)} all match {image_name}; "
                            "left out")
        else:
            chosen[image_name] = masks[0]
    return chosen, findings


def _patient_keys(image: ExportImage, ids: dict[str, set[str]], row_patients: set[str]) -> list[str]:
    # one namespace for the table's patient column and DICOM PatientID: equal strings are one patient
    keys = [f"patient:{p}" for p in sorted(row_patients | ids.get("PatientID", set()))]
    if not ids.get("PatientID") and ids.get("StudyInstanceUID"):
        keys += [f"study:{s}" for s in sorted(ids["StudyInstanceUID"])]  # no PatientID: keep a study together
    return keys


def build_datalist(images_dir: str | Path, table: LabelTable, dataset_dir: str | Path, *, table_name: str = "labels",
                   masks_dir: str | Path | None = None, spatial_dims: int = 2,
                   proportions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0,
                   exclude: tuple[str | Path, ...] = ()) -> DatalistBuild:
    """Match the table to the images (and masks), split by patient and return the datalist.

    Entry paths are relative to ``dataset_dir`` (the folder the datalist is written to).
    ``exclude``: files inside ``images_dir`` that are not images (the labels file, the datalist).
    """
    images_dir = Path(images_dir).resolve()
    dataset_dir = Path(dataset_dir).resolve()
    not_images = tuple(Path(p).resolve() for p in (*exclude, *([masks_dir] if masks_dir is not None else [])))
    images, skipped = find_export_images(images_dir, spatial_dims, not_images)
    identifiers = {i.name: read_identifiers(i, all_instances=table.key_kind == "sop") if i.files else {}
                   for i in images}
    labels, row_patients, findings = match_rows(table, images, identifiers, images_dir, table_name)
    findings = table.problems + findings + skipped
    masks: dict[str, Path] = {}
    if masks_dir is not None:
        masks, mask_findings = match_masks(Path(masks_dir).resolve(), images, identifiers)
        findings += mask_findings
    labelled = [i for i in images if i.name in labels]
    patients = {i.name: _patient_keys(i, identifiers[i.name], row_patients[i.name]) for i in labelled}
    groups = patient_groups([i.name for i in labelled], patients)
    split_of = grouped_stratified_split(groups, labels, proportions, seed)
    by_name = {i.name: i for i in labelled}

    def entry(name: str) -> dict:
        item = {"image": _dataset_path(by_name[name].path, dataset_dir), "label": labels[name]}
        if name in masks:
            item["mask"] = _dataset_path(masks[name], dataset_dir)
        return item

    datalist = {split: [entry(n) for n in names] for split, names in split_of.items()}
    group_of = {n: g for g in groups for n in g}
    summary = [f"{len(images)} images found, {len(labelled)} labelled, {len(groups)} patient groups"
               + (f", {len(masks)} with masks" if masks_dir is not None else "")]
    ungrouped = sum(1 for i in labelled if not patients[i.name])
    if ungrouped:
        summary.append(f"{ungrouped} labelled images have no patient (NIfTI without a patient column): "
                       "each is a group of its own")
    for split, names in split_of.items():
        counts = Counter(labels[n] for n in names)
        summary.append(f"{split}: {len(names)} images, {len({id(group_of[n]) for n in names})} patient groups, "
                       f"labels {dict(sorted(counts.items()))}")
    return DatalistBuild(datalist, findings, summary)


def _dataset_path(path: Path, dataset_dir: Path) -> str:
    name = Path(os.path.relpath(path, dataset_dir)).as_posix()
    return name + "/" if path.is_dir() else name


def datalist_json(build: DatalistBuild, classes: list[str] | None = None) -> str:
    """The datalist file's text: the three splits and, with class names, their ``labels`` index."""
    content = {split: build.datalist[split] for split in SPLITS}
    if classes:
        content["labels"] = {str(i): name for i, name in enumerate(classes)}
    return json.dumps(content, indent=1) + "\n"
