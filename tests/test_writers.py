"""Writer plug-ins: every DICOM file they write passes dciodvfy, keeps patient and study, and is reproducible;
each writes the files it names; the rendering they share has known answers."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage
from PIL import Image
from pydicom.data import get_testdata_file

import transforms
from bundle.files import atomic_write
from bundle.inputs import InferenceInput
from bundle.synthetic import make_dataset
from bundle.visualize import blend_evidence, display_rgb
from bundle.writers import (
    EvidenceCase,
    ModelIdentity,
    NiftiMapWriter,
    OverlayPngWriter,
    ParametricMapNotApplicable,
    ParametricMapWriter,
    SecondaryCaptureWriter,
)
from bundle.writers.conformance import conformant
from tests.conftest import dicom_validation_errors

MODEL = ModelIdentity("resnet18-softcam", "0.1.0", "0123abcd")
CLASSES = {0: "no lesion", 1: "lesion"}
SOURCES = {
    "CT": "CT_small.dcm",
    "MR": "MR_small.dcm",
    "CR MONOCHROME1": "dicomdirtests/77654033/CR1/6154",
    "US RGB": "examples_rgb_color.dcm",
    "RGB RLE": "SC_rgb_rle.dcm",
    "JPEG 2000": "JPEG2000.dcm",
    "US palette colour": "examples_palette.dcm",
}


def _blob(rows, cols):
    yy, xx = np.mgrid[:rows, :cols]
    return np.exp(-((yy - rows / 3) ** 2 + (xx - cols / 2) ** 2) / (rows / 8) ** 2).astype(np.float32)


def case_of(path, probabilities=(0.13, 0.87), all_classes=False) -> EvidenceCase:
    """The case the inference run builds for one single-frame DICOM file, with a blob as the evidence."""
    path = Path(path)
    loaded = LoadImage(reader=transforms.DicomReader(), image_only=True)(str(path))
    header = transforms.read_dicom(path, defer_size="1 KB")
    source, notes = conformant(header)
    evidence = _blob(header.Rows, header.Columns).T  # (cols, rows): MONAI's axis order
    predicted = int(np.argmax(probabilities))
    return EvidenceCase(
        input=InferenceInput("dicom", (path,)), stem=path.stem,
        probabilities=list(probabilities), predicted_class=predicted,
        classes=(0, 1) if all_classes else (predicted,), evidence=np.stack([-evidence, evidence]), affine=np.eye(4),
        network_image=np.zeros((32, 32), np.float32), network_maps=np.stack([_blob(32, 32)] * 2), model=MODEL,
        class_names=CLASSES, sources=[source], source_display=display_rgb(loaded.numpy(), transforms.image_description(header)),
        notes=notes,
    )


@pytest.fixture(scope="module")
def synthetic_sources(tmp_path_factory):
    out = tmp_path_factory.mktemp("writer_sources")
    make_dataset(out / "cr", dims=2, n=2, seed=8, size=64)
    make_dataset(out / "ct", dims=3, n=1, seed=8, size=24, dicom_series=True)
    return sorted((out / "cr" / "images").glob("*.dcm"))[0], sorted((out / "ct" / "series").glob("*/*.dcm"))


def _source_paths(synthetic_sources):
    cr, ct = synthetic_sources
    return {**{kind: Path(get_testdata_file(name)) for kind, name in SOURCES.items()},
            "synthetic CR": cr, "synthetic CT slice": ct[len(ct) // 2]}


def test_secondary_captures_pass_dciodvfy_and_keep_patient_and_study(tmp_path, synthetic_sources):
    writer = SecondaryCaptureWriter()
    for kind, path in _source_paths(synthetic_sources).items():
        case = case_of(path)
        (written,) = writer.write(case, tmp_path)
        assert [written.path] == writer.file_names(case), kind
        assert dicom_validation_errors(tmp_path / written.path) == [], kind
        sc, source = pydicom.dcmread(tmp_path / written.path), pydicom.dcmread(path)
        assert (written.sop_class_uid, written.sop_instance_uid) == (sc.SOPClassUID, sc.SOPInstanceUID)
        assert sc.PatientID == source.PatientID and sc.StudyInstanceUID == source.StudyInstanceUID, kind
        for keyword in ("PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
                        "StudyTime", "ReferringPhysicianName"):
            assert (sc.get(keyword) or None) == (source.get(keyword) or None), (kind, keyword)  # type 2: present, maybe empty
        equipment = [e for e in sc.ContributingEquipmentSequence if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"]
        if source.get("Manufacturer"):  # the source's acquisition equipment, as highdicom describes it
            assert [(e.Manufacturer, e.get("ManufacturerModelName"), e.get("StationName")) for e in equipment] == [
                (source.Manufacturer, source.get("ManufacturerModelName") or None, source.get("StationName") or None)], kind
        else:
            assert equipment == [], kind
        assert sc.SeriesInstanceUID != source.SeriesInstanceUID
        assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert sc.PhotometricInterpretation == "RGB" and sc.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        reference = sc.SourceImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert "resnet18-softcam 0.1.0" in sc.DerivationDescription
        assert sc.BurnedInAnnotation == "NO" and sc.ContentQualification == "RESEARCH"
        assert "RESEARCH USE ONLY" in sc.SeriesDescription
        assert sc.Manufacturer and sc.ManufacturerModelName == "resnet18-softcam" and sc.SoftwareVersions == "0.1.0"
        if source.get("BodyPartExamined"):
            assert sc.BodyPartExamined == source.BodyPartExamined


def test_writing_again_gives_the_same_uids_and_another_model_other_ones(tmp_path, synthetic_sources):
    case = case_of(synthetic_sources[0])
    first = SecondaryCaptureWriter().write(case, tmp_path / "a")[0]
    again = SecondaryCaptureWriter().write(case_of(synthetic_sources[0]), tmp_path / "b")[0]
    assert (first.sop_instance_uid, first.series_instance_uid) == (again.sop_instance_uid, again.series_instance_uid)
    case.model = ModelIdentity(MODEL.name, MODEL.version, "ffff0000")  # retrained weights
    other = SecondaryCaptureWriter().write(case, tmp_path / "c")[0]
    assert other.sop_instance_uid != first.sop_instance_uid and other.series_instance_uid != first.series_instance_uid


def test_the_capture_shows_the_source_as_a_viewer_would():
    """The SC shows the source's display pixels where the evidence is lowest (no colour blended in), and those
    are what a viewer shows: palette colour through its tables, RGB as stored, MONOCHROME1 inverted."""
    for kind in ("CR MONOCHROME1", "US palette colour", "US RGB"):
        path = get_testdata_file(SOURCES[kind])
        case = case_of(path)
        plane, display = case.evidence[case.predicted_class].T, np.swapaxes(case.source_display, 0, 1)
        sc = SecondaryCaptureWriter().build(case.sources[0], display, plane, 1, 0.87, MODEL, "lesion")
        scale = max(1, -(-256 // min(plane.shape)))  # sources under 256 pixels a side are enlarged
        coldest = np.unravel_index(np.argmin(plane), plane.shape)
        assert np.array_equal(sc.pixel_array[coldest[0] * scale, coldest[1] * scale], display[coldest]), kind
        ds = pydicom.dcmread(path)
        if kind == "US palette colour":  # 16-bit tables
            assert np.abs(display - pydicom.pixels.apply_color_lut(ds.pixel_array, ds) / 257).max() <= 0.5
        elif kind == "US RGB":
            assert np.array_equal(display, ds.pixel_array)
        else:  # the brightest stored pixel is the darkest shown
            assert display[np.unravel_index(np.argmax(ds.pixel_array), plane.shape)][0] == display.min()


def test_blending_leaves_the_image_unchanged_where_there_is_no_evidence():
    display = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    evidence = np.zeros((8, 8), np.float32)
    evidence[2, 3] = 5.0
    blended = blend_evidence(display, evidence)
    untouched = np.ones((8, 8), bool)
    untouched[2, 3] = False
    assert np.array_equal(blended[untouched], np.round(255 * display[untouched]).astype(np.uint8))
    assert blended[2, 3, 0] > blended[2, 3, 2]  # the strongest evidence shows red (jet's top end)
    as_bytes = np.round(255 * display).astype(np.uint8)
    assert np.array_equal(blend_evidence(as_bytes, evidence)[untouched], as_bytes[untouched])
    with pytest.raises(ValueError, match="not on the RGB image grid"):
        blend_evidence(display, np.zeros((4, 4)))


def test_display_known_answers():
    description = {"samples_per_pixel": 1, "photometric_interpretation": "MONOCHROME2", "window_center": 50.0,
                   "window_width": 100.0, "bits_stored": 12}
    values = np.array([[-10.0, 0.0, 50.0, 100.0, 400.0]])
    assert display_rgb(values, description)[..., 0].tolist() == [[0, 0, 128, 255, 255]]
    inverted = display_rgb(values, {**description, "photometric_interpretation": "MONOCHROME1"})
    assert inverted[..., 0].tolist() == [[255, 255, 128, 0, 0]]
    colour = {**description, "samples_per_pixel": 3, "bits_stored": 16}
    assert display_rgb(np.full((1, 1, 3), 65535.0), colour).tolist() == [[[255, 255, 255]]]


def test_parametric_maps_hold_the_float_evidence_and_pass_dciodvfy(tmp_path, synthetic_sources):
    _, series = synthetic_sources
    writer = ParametricMapWriter()
    cases = {"CT": [get_testdata_file("CT_small.dcm")], "MR": [get_testdata_file("MR_small.dcm")],
             "synthetic CT series": series}
    for kind, paths in cases.items():
        sources = [conformant(pydicom.dcmread(p, stop_before_pixels=True))[0] for p in paths]
        evidence = np.random.default_rng(1).standard_normal((len(sources), sources[0].Rows, sources[0].Columns))
        pm = writer.build(sources, evidence.squeeze(0) if len(sources) == 1 else evidence, "lesion", MODEL)
        pm.save_as(tmp_path / f"{kind}.dcm", enforce_file_format=True)
        assert dicom_validation_errors(tmp_path / f"{kind}.dcm") == [], kind
        pm = pydicom.dcmread(tmp_path / f"{kind}.dcm")
        assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
        assert pm.StudyInstanceUID == sources[0].StudyInstanceUID and pm.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
        stored = np.frombuffer(pm.FloatPixelData, dtype=np.float32).reshape(evidence.shape)
        # frames may be reordered along the volume: each must hold the evidence of the slice at its position
        slice_at = {tuple(np.round(np.asarray(ds.ImagePositionPatient, float), 3)): i for i, ds in enumerate(sources)}
        for frame, groups in zip(stored, pm.PerFrameFunctionalGroupsSequence):
            position = tuple(np.round(np.asarray(groups.PlanePositionSequence[0].ImagePositionPatient, float), 3))
            assert np.array_equal(frame, evidence[slice_at[position]].astype(np.float32)), kind
        assert pm.ContentLabel == "EVIDENCE" and pm.ContentQualification == "RESEARCH"


def test_no_parametric_map_without_a_frame_of_reference(synthetic_sources):
    case = case_of(synthetic_sources[0])
    assert ParametricMapWriter().skip_reason(case) == (
        "CR image has no Frame of Reference: no Parametric Map, the Secondary Capture carries the evidence")
    with pytest.raises(ParametricMapNotApplicable, match="CR image has no Frame of Reference"):
        ParametricMapWriter().build(case.sources, case.evidence[1].T, "lesion", MODEL)


def test_every_writer_writes_the_files_it_names(tmp_path):
    case = case_of(get_testdata_file("CT_small.dcm"), all_classes=True)
    for writer in (NiftiMapWriter(), OverlayPngWriter(), SecondaryCaptureWriter(), ParametricMapWriter()):
        written = writer.write(case, tmp_path)
        assert [w.path for w in written] == writer.file_names(case), writer.kind
        assert all((tmp_path / w.path).is_file() for w in written)
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        "CT_small_class0_evidence.nii.gz", "CT_small_class1_evidence.nii.gz"]
    nifti = nib.load(tmp_path / "maps" / "CT_small_class1_evidence.nii.gz")
    assert np.array_equal(nifti.get_fdata().astype(np.float32), case.evidence[1])
    assert Image.open(tmp_path / "overlays" / "CT_small.png").size == (32, 32)
    assert len(list((tmp_path / "dicom" / "secondary_capture").iterdir())) == 2
    assert len(list((tmp_path / "dicom" / "parametric_map").iterdir())) == 2
    assert not list(tmp_path.rglob("*.part"))


def test_a_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "out.dcm"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"new, half written")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
    with atomic_write(target) as tmp:
        tmp.write_text(json.dumps({"whole": True}))
    assert json.loads(target.read_text()) == {"whole": True} and list(tmp_path.iterdir()) == [target]
