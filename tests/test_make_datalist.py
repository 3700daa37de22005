"""scripts/make_datalist.py: a PACS export and a CSV of labels to a datalist, split by patient."""

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.bundle import ConfigParser
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from bundle.datalist_builder import build_datalist
from bundle.label_table import LabelTableError, read_label_table
from bundle.splits import grouped_stratified_split, parse_proportions, patient_groups

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_datalist.py"


def write_dicom(path: Path, patient: str, study: str, series: str, accession: str, frames: int = 1,
                position: float = 0.0) -> str:
    """A tiny CT image (8 x 8, ``frames`` frames) with the given identifiers; returns its SOP Instance UID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if frames == 1 else SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.AccessionNumber = patient, f"Name^{patient}", accession
    with warnings.catch_warnings():  # an invalid UID on purpose: pydicom would warn here
        warnings.simplefilter("ignore")
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = "CT"
    ds.InstanceNumber = int(position) + 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, position], [1, 0, 0, 0, 1, 0]
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.arange(64 * frames, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds.SOPInstanceUID


def write_nifti(path: Path, shape=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), path)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


@pytest.fixture(scope="module")
def export_2d(tmp_path_factory):
    """20 patients (10 per label) with one study each: 1 or 2 series of 1 or 2 radiographs, P00 with a
    second study; 4 NIfTI images of two pseudonymous patients; a multi-frame file; a text file."""
    root = tmp_path_factory.mktemp("export2d")
    images = root / "images"
    facts = {"patient_of": {}, "uids": set(), "label_of_patient": {}}
    for p in range(20):
        patient, label = f"PAT{p:03d}", p % 2
        facts["label_of_patient"][patient] = label
        for st in range(2 if p == 0 else 1):
            study, accession = generate_uid(), f"ACC{p:03d}{st}"
            facts["uids"] |= {study, accession, patient}
            for se in range(1 + p % 2):
                series = generate_uid()
                facts["uids"].add(series)
                for im in range(1 + (p + se) % 2):
                    name = f"c{p:02d}/st{st}/se{se}/im{im}.dcm"  # folder names say nothing of the patient
                    sop = write_dicom(images / name, patient, study, series, accession)
                    facts["uids"].add(sop)
                    facts["patient_of"][name] = patient
    for i, pseudonym in enumerate(["anon1", "anon1", "anon2", "anon2"]):
        write_nifti(images / "nifti" / f"case{i}.nii.gz")
        facts["patient_of"][f"nifti/case{i}.nii.gz"] = pseudonym
        facts["label_of_patient"][pseudonym] = i // 2
    write_dicom(images / "cine" / "multi.dcm", "PAT900", generate_uid(), generate_uid(), "ACC900", frames=3)
    (images / "notes.txt").write_text("exported by the PACS")
    return root, facts


def path_rows(facts, leave_out=("c05/st0/se0/im0.dcm",)):
    """One CSV row per image (patient column for all), less ``leave_out``."""
    rows = []
    for name, patient in sorted(facts["patient_of"].items()):
        if name not in leave_out:
            rows.append([name, facts["label_of_patient"][patient], patient if name.startswith("nifti") else ""])
    return rows


def test_path_keyed_labels_become_a_datalist_split_by_patient_with_every_mismatch_reported(export_2d):
    root, facts = export_2d
    rows = path_rows(facts, leave_out=("c02/st0/se0/im0.dcm", "c05/st0/se0/im0.dcm"))
    rows.insert(3, ["c99/st0/se0/im0.dcm", 1, ""])  # no such image: row 5 (the header is row 1)
    rows.insert(6, ["c02/st0/se0/im0.dcm", "", ""])  # no label: row 8 (the image is then unlabelled)
    write_csv(root / "labels.csv", ["path", "label", "patient"], rows)
    table = read_label_table(root / "labels.csv")
    assert table.key_kind == "path"
    build = build_datalist(root / "images", table, root, table_name="labels.csv")

    notes = [f for f in build.findings if f.startswith("skipped notes.txt: not a readable DICOM or NIfTI file")]
    assert len(notes) == 1
    assert sorted(set(build.findings) - set(notes)) == sorted([
        "labels.csv row 8: label '' is not a class index (name classes with --classes)",
        "labels.csv row 5: matches no image (by path)",
        "unlabelled c02/st0/se0/im0.dcm: no row of labels.csv names it",
        "unlabelled c05/st0/se0/im0.dcm: no row of labels.csv names it",
        "skipped cine/multi.dcm: multi-frame file; a 2D datalist entry cannot name one frame "
        "(--spatial_dims 3 takes it as a volume)",
    ])
    entries = {split: build.datalist[split] for split in ("training", "validation", "test")}
    names = {s: [e["image"].removeprefix("images/") for e in items] for s, items in entries.items()}
    labelled = set(facts["patient_of"]) - {"c02/st0/se0/im0.dcm", "c05/st0/se0/im0.dcm"}
    assert sorted(sum(names.values(), [])) == sorted(labelled)
    # no patient in two splits (the NIfTI pseudonyms from the patient column included)
    split_of_patient = {}
    for split, items in names.items():
        for name in items:
            assert split_of_patient.setdefault(facts["patient_of"][name], split) == split, name
    # labels come from the table; proportions within one patient's images of 70/15/15 per label
    for split, items in entries.items():
        for e in items:
            assert e["label"] == facts["label_of_patient"][facts["patient_of"][e["image"].removeprefix("images/")]]
    for label in (0, 1):
        total = sum(1 for n in labelled if facts["label_of_patient"][facts["patient_of"][n]] == label)
        for split, share in zip(entries, (0.7, 0.15, 0.15)):
            count = sum(1 for e in entries[split] if e["label"] == label)
            assert abs(count - share * total) <= 3, (split, label, count, total)  # a patient has at most 3 images
            assert count > 0
    text = json.dumps(build.datalist) + "\n".join(build.findings + build.summary)
    assert not [u for u in facts["uids"] if u in text]


def test_the_split_is_deterministic_for_a_seed_and_changes_with_it(export_2d):
    root, facts = export_2d
    write_csv(root / "labels_all.csv", ["File Name", "Label", "Patient ID"], path_rows(facts, leave_out=()))
    table = read_label_table(root / "labels_all.csv")
    first = build_datalist(root / "images", table, root, seed=7).datalist
    assert build_datalist(root / "images", table, root, seed=7).datalist == first
    assert build_datalist(root / "images", table, root, seed=8).datalist != first


def test_grouped_split_meets_its_proportions_exactly_when_groups_are_single_images():
    items = [f"i{n:02d}" for n in range(40)]
    labels = {i: int(i[1:]) % 2 for i in items}
    groups = patient_groups(items, {})
    assert groups == [[i] for i in items]
    split = grouped_stratified_split(groups, labels, parse_proportions("70/15/15"), seed=0)
    assert [len(split[s]) for s in ("training", "validation", "test")] == [28, 6, 6]
    assert all(sum(labels[i] for i in split[s]) * 2 == len(split[s]) for s in split)  # half of each label
    assert grouped_stratified_split(groups, labels, parse_proportions("80/20/0"), seed=0)["test"] == []
    with pytest.raises(ValueError, match="70/15/15"):
        parse_proportions("70/30")


def test_patient_groups_join_images_through_any_shared_patient_key():
    groups = patient_groups(["a", "b", "c", "d", "e"],
                            {"a": ["patient:1"], "b": ["patient:2"], "c": ["patient:1", "patient:2"], "e": ["patient:3"]})
    assert groups == [["a", "b", "c"], ["d"], ["e"]]


def test_series_study_and_accession_rows_label_all_their_images(export_2d):
    root, facts = export_2d
    images = root / "images"
    header = {name: pydicom.dcmread(images / name, stop_before_pixels=True)
              for name in facts["patient_of"] if name.endswith(".dcm")}
    for key, keyword in (("series", "SeriesInstanceUID"), ("study", "StudyInstanceUID"), ("accession", "AccessionNumber")):
        values = sorted({str(ds[keyword].value) for ds in header.values()})
        label = {v: i % 2 for i, v in enumerate(values)}
        write_csv(root / f"by_{key}.csv", [keyword, "label"], [[v, label[v]] for v in values])
        build = build_datalist(images, read_label_table(root / f"by_{key}.csv"), root, table_name=f"by_{key}.csv")
        got = {e["image"].removeprefix("images/"): e["label"] for s in build.datalist.values() for e in s}
        assert got == {n: label[str(ds[keyword].value)] for n, ds in header.items()}
        assert sum(f.startswith("unlabelled nifti/") for f in build.findings) == 4  # NIfTI have no UIDs


def test_class_names_and_conflicting_rows(export_2d, tmp_path):
    root, facts = export_2d
    rows = [[n, ["benign", "malignant"][facts["label_of_patient"][p]]] for n, p in sorted(facts["patient_of"].items())]
    first_row = 2 + [r[0] for r in rows].index("c01/st0/se0/im0.dcm")
    rows.append(["c01/st0/se0/im0.dcm", "benign"])  # c01 is malignant: a conflict
    write_csv(tmp_path / "names.csv", ["path", "diagnosis"], rows)
    with pytest.raises(LabelTableError, match="no label column"):
        read_label_table(tmp_path / "names.csv")
    table = read_label_table(tmp_path / "names.csv", label_column="diagnosis", classes=["benign", "malignant"])
    build = build_datalist(root / "images", table, root, table_name="names.csv")
    conflict = [f for f in build.findings if "different labels" in f]
    assert conflict == [f"left out c01/st0/se0/im0.dcm: names.csv rows {first_row}, {len(rows) + 1} give it "
                        "different labels [0, 1]"]
    unlabelled = read_label_table(tmp_path / "names.csv", label_column="diagnosis")
    assert len(unlabelled.rows) == 0 and "name classes with --classes" in unlabelled.problems[0]


@pytest.fixture(scope="module")
def export_3d(tmp_path_factory):
    """CT series folders (3 slices) of 7 patients, two with a second study, one with invalid UIDs; a multi-frame volume; a
    folder mixing two series; a lone slice; a NIfTI volume; masks by path, by UID and a stray one."""
    root = tmp_path_factory.mktemp("export3d")
    images, masks = root / "images", root / "masks"
    facts = {"patient_of": {}, "series_of": {}, "uids": set()}

    def series_folder(folder, patient, study, accession, series=None):
        series = series or generate_uid()
        facts["uids"] |= {patient, study, series, accession}
        for z in range(3):
            facts["uids"].add(write_dicom(images / folder / f"{z}.dcm", patient, study, series, accession, position=z))
        facts["patient_of"][folder + "/"], facts["series_of"][folder + "/"] = patient, series
        return series

    for p in range(6):
        for st in range(1 + (p < 2)):
            series_folder(f"p{p}/st{st}", f"PAT{p}", generate_uid(), f"ACC{p}{st}")
    series_folder("p9/st0", "PAT9", "1.2.03.77", "ACC9", series="1.2.3.x9")  # invalid UIDs: pydicom would quote them
    mf_series = generate_uid()
    write_dicom(images / "mf" / "volume.dcm", "PAT6", generate_uid(), mf_series, "ACC6", frames=4)
    facts["patient_of"]["mf/volume.dcm"], facts["series_of"]["mf/volume.dcm"] = "PAT6", mf_series
    study, series_a, series_b = generate_uid(), generate_uid(), generate_uid()
    for z in range(2):  # two series in one folder: the folder cannot be an entry
        write_dicom(images / "mixed" / f"a{z}.dcm", "PAT7", study, series_a, "ACC7", position=z)
        write_dicom(images / "mixed" / f"b{z}.dcm", "PAT7", study, series_b, "ACC7", position=z)
    write_dicom(images / "lone" / "slice.dcm", "PAT8", generate_uid(), generate_uid(), "ACC8")
    write_nifti(images / "vol.nii.gz", (8, 8, 4))
    write_nifti(masks / "p0" / "st0.nii.gz", (8, 8, 3))  # by path: the series folder p0/st0/
    write_nifti(masks / f"{facts['series_of']['p3/st0/']}.nii.gz", (8, 8, 3))  # by Series Instance UID
    write_nifti(masks / "volume.nii.gz", (8, 8, 4))  # by file name: mf/volume.dcm
    write_nifti(masks / "stray.nii.gz", (8, 8, 3))
    return root, facts


def test_3d_series_folders_multiframe_files_and_masks(export_3d):
    root, facts = export_3d
    write_csv(root / "labels.csv", ["SeriesInstanceUID", "label"],
              [[s, i % 2] for i, s in enumerate(facts["series_of"].values())] + [["1.2.3.999", 0]])
    table = read_label_table(root / "labels.csv")
    assert (table.key_kind, table.key_column) == ("series", "SeriesInstanceUID")
    build = build_datalist(root / "images", table, root, table_name="labels.csv", masks_dir=root / "masks",
                           spatial_dims=3, proportions=(0.5, 0.25, 0.25), seed=1)
    assert sorted(build.findings) == sorted([
        "labels.csv row 12: matches no image (by SeriesInstanceUID)",
        "mask stray.nii.gz matches no image",
        "skipped lone/slice.dcm: a single 2D image cannot be the input of a 3D model",
        "skipped the series in mixed/: the folder holds other DICOM files too; a series entry is a folder of its own",
        "unlabelled vol.nii.gz: no row of labels.csv names it",
    ])
    entries = [e for split in build.datalist.values() for e in split]
    assert sorted(e["image"] for e in entries) == sorted(f"images/{n}" for n in facts["patient_of"])
    masks = {e["image"]: e.get("mask") for e in entries}
    assert masks["images/p0/st0/"] == "masks/p0/st0.nii.gz"
    assert masks["images/p3/st0/"] == f"masks/{facts['series_of']['p3/st0/']}.nii.gz"
    assert masks["images/mf/volume.dcm"] == "masks/volume.nii.gz"
    assert sum(m is not None for m in masks.values()) == 3
    split_of = {facts["patient_of"][e["image"].removeprefix("images/")]: s
                for s, items in build.datalist.items() for e in items}
    for s, items in build.datalist.items():  # the patients with two studies keep both in one split
        assert all(split_of[facts["patient_of"][e["image"].removeprefix("images/")]] == s for e in items)
    text = json.dumps(build.datalist) + "\n".join(build.findings + build.summary)
    assert not [u for u in facts["uids"] - {facts["series_of"]["p3/st0/"]} if u in text]


def test_the_command_writes_a_datalist_the_training_config_accepts(export_3d, tmp_path):
    root, facts = export_3d
    write_csv(root / "by_path.csv", ["path", "label"], [[n, i % 2] for i, n in enumerate(sorted(facts["patient_of"]))])
    out = root / "datalist.json"
    cmd = [sys.executable, str(SCRIPT), "--images", str(root / "images"), "--labels", str(root / "by_path.csv"),
           "--masks", str(root / "masks"), "--spatial_dims", "3", "--split", "60/20/20", "--seed", "3"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2, result.stderr  # written, with findings (the mixed folder, the stray mask, ...)
    assert "labels keyed by path (column 'path')" in result.stdout
    assert "datalist check passed: training" in result.stdout and f"--dataset_dir {root}" in result.stdout
    assert "unlabelled vol.nii.gz" in result.stderr and "mask stray.nii.gz matches no image" in result.stderr
    named_mask = facts["series_of"]["p3/st0/"]  # a mask file the user named by its Series UID
    assert not [u for u in facts["uids"] - {named_mask} if u in result.stdout + result.stderr + out.read_text()]
    first = out.read_text()
    assert subprocess.run(cmd, capture_output=True, cwd=ROOT).returncode == 2 and out.read_text() == first

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser["bundle_root"], parser["dataset_dir"] = str(ROOT), str(root)
    datalist = parser.get_parsed_content("datalist")
    assert sum(len(v) for v in datalist.values()) == len(facts["patient_of"])
    assert all(Path(e["image"]).exists() for v in datalist.values() for e in v)

    # nothing usable: an error, nothing written
    write_csv(tmp_path / "none.csv", ["path", "label"], [["absent.dcm", 0]])
    result = subprocess.run([sys.executable, str(SCRIPT), "--images", str(root / "images"), "--labels",
                             str(tmp_path / "none.csv"), "--out", str(tmp_path / "d.json")], capture_output=True, text=True)
    assert result.returncode == 1 and "nothing written" in result.stderr and not (tmp_path / "d.json").exists()
    help_text = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True).stdout
    for kind in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "AccessionNumber", "--masks"):
        assert kind in help_text


def test_odd_identifiers_are_not_quoted_in_warnings_or_logs(export_3d, tmp_path):
    # pydicom reports an invalid UID through warnings and its logger, quoting it; the bundle's privacy
    # filters (installed on import) must keep it out of everything the command prints
    root, facts = export_3d
    write_csv(tmp_path / "labels.csv", ["path", "label"], [["p9/st0", 1], ["p0/st0", 0]])
    cmd = [sys.executable, "-W", "always", str(SCRIPT), "--images", str(root / "images"), "--labels",
           str(tmp_path / "labels.csv"), "--spatial_dims", "3", "--split", "50/50/0", "--out", str(tmp_path / "datalist.json")]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "always"})
    assert result.returncode == 2, result.stderr  # the other images are unlabelled
    said = result.stdout + result.stderr
    assert "<withheld>" in said  # pydicom did warn about the invalid UID, without quoting it
    assert "1.2.3.x9" not in said and "1.2.03.77" not in said
    assert "images/p9/st0/" in (tmp_path / "datalist.json").read_text()


def test_labels_masks_and_datalist_inside_the_images_folder_are_not_taken_for_images(tmp_path):
    export = tmp_path / "export"
    for n in range(2):
        write_dicom(export / f"im{n}.dcm", f"PAT{n}", generate_uid(), generate_uid(), f"ACC{n}")
    write_nifti(export / "masks" / "im0.nii.gz")
    write_csv(export / "labels.csv", ["path", "label"], [["im0.dcm", 0], ["im1.dcm", 1]])
    out = export / "datalist.json"
    out.write_text("{}")  # a datalist of an earlier run
    cmd = [sys.executable, str(SCRIPT), "--images", str(export), "--labels", str(export / "labels.csv"),
           "--masks", str(export / "masks"), "--split", "50/50/0", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    datalist = json.loads(out.read_text())
    assert sorted(e["image"] for s in ("training", "validation") for e in datalist[s]) == ["im0.dcm", "im1.dcm"]
    assert [e.get("mask") for s in datalist.values() for e in s if e["image"] == "im0.dcm"] == ["masks/im0.nii.gz"]


def test_label_tables_as_spreadsheets_save_them(tmp_path):
    # a BOM, ';' separators, spaced column names, a blank last line, float-looking labels
    (tmp_path / "excel.csv").write_bytes("\ufeffSeries Instance UID;Accession Number;Diagnosis\n1.2.3;A1;1.0\n4.5.6;A2;0\n;;\n"
                                         .encode("utf-8"))
    table = read_label_table(tmp_path / "excel.csv", label_column="Diagnosis")
    assert (table.key_kind, table.key_column) == ("series", "Series Instance UID")  # the more specific key wins
    assert [(r.row, r.key, r.label) for r in table.rows] == [(2, "1.2.3", 1), (3, "4.5.6", 0)] and not table.problems
    by_accession = read_label_table(tmp_path / "excel.csv", key="accession", label_column="Diagnosis")
    assert [r.key for r in by_accession.rows] == ["A1", "A2"]
    named = read_label_table(tmp_path / "excel.csv", key_column="Accession Number", label_column="Diagnosis")
    assert named.key_kind == "accession"
    with pytest.raises(LabelTableError, match="no SOPInstanceUID column"):
        read_label_table(tmp_path / "excel.csv", key="sop", label_column="Diagnosis")
    write_csv(tmp_path / "nokey.csv", ["name", "label"], [["x", 1]])
    with pytest.raises(LabelTableError, match="no key column"):
        read_label_table(tmp_path / "nokey.csv")
    with pytest.raises(LabelTableError, match="labels file not found"):
        read_label_table(tmp_path / "absent.csv")
