"""DICOM writers: every file they write passes dciodvfy, keeps patient and study, and is reproducible."""

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from bundle.synthetic import make_dataset
from bundle.writers import ModelIdentity, ParametricMapNotApplicable, ParametricMapWriter, SecondaryCaptureWriter, atomic_write
from bundle.writers.secondary_capture import blend_evidence, source_frame
from tests.conftest import dicom_validation_errors

MODEL = ModelIdentity("resnet18-softcam", "0.1.0", "0123abcd")
SOURCES = {
    "CT": "CT_small.dcm",
    "MR": "MR_small.dcm",
    "CR MONOCHROME1": "dicomdirtests/77654033/CR1/6154",
    "US RGB": "examples_rgb_color.dcm",
    "RGB RLE": "SC_rgb_rle.dcm",
    "JPEG 2000": "JPEG2000.dcm",
}


def _blob(ds):
    yy, xx = np.mgrid[: ds.Rows, : ds.Columns]
    return np.exp(-((yy - ds.Rows / 3) ** 2 + (xx - ds.Columns / 2) ** 2) / (ds.Rows / 8) ** 2).astype(np.float32)


@pytest.fixture(scope="module")
def synthetic_sources(tmp_path_factory):
    out = tmp_path_factory.mktemp("writer_sources")
    make_dataset(out / "cr", dims=2, n=2, seed=8, size=64)
    make_dataset(out / "ct", dims=3, n=1, seed=8, size=24, dicom_series=True)
    cr = pydicom.dcmread(sorted((out / "cr" / "images").glob("*.dcm"))[0])
    ct = [pydicom.dcmread(f) for f in sorted((out / "ct" / "series").glob("*/*.dcm"))]
    return cr, ct


def _sources(synthetic_sources):
    cr, ct = synthetic_sources
    sources = {kind: pydicom.dcmread(get_testdata_file(name)) for kind, name in SOURCES.items()}
    sources["synthetic CR"] = cr
    sources["synthetic CT slice"] = ct[len(ct) // 2]
    return sources


def test_secondary_captures_pass_dciodvfy_and_keep_patient_and_study(tmp_path, synthetic_sources):
    writer = SecondaryCaptureWriter(MODEL, {0: "no lesion", 1: "lesion"})
    for kind, source in _sources(synthetic_sources).items():
        path = writer.write(tmp_path / f"{kind}.dcm", source, _blob(source), 1, 0.87)
        assert dicom_validation_errors(path) == [], kind
        sc = pydicom.dcmread(path)
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
    source, _ = synthetic_sources
    first = pydicom.dcmread(SecondaryCaptureWriter(MODEL).write(tmp_path / "a.dcm", source, _blob(source), 1, 0.9))
    again = pydicom.dcmread(SecondaryCaptureWriter(MODEL).write(tmp_path / "b.dcm", source, _blob(source), 1, 0.9))
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    retrained = ModelIdentity(MODEL.name, MODEL.version, "ffff0000")
    other = pydicom.dcmread(SecondaryCaptureWriter(retrained).write(tmp_path / "c.dcm", source, _blob(source), 1, 0.9))
    assert other.SOPInstanceUID != first.SOPInstanceUID and other.SeriesInstanceUID != first.SeriesInstanceUID


def test_blending_leaves_the_image_unchanged_where_there_is_no_evidence():
    display = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    evidence = np.zeros((8, 8), np.float32)
    evidence[2, 3] = 5.0
    blended = blend_evidence(display, evidence)
    untouched = np.ones((8, 8), bool)
    untouched[2, 3] = False
    assert np.array_equal(blended[untouched], np.round(255 * display[untouched]).astype(np.uint8))
    assert blended[2, 3, 0] > blended[2, 3, 2]  # the strongest evidence shows red (jet's top end)
    with pytest.raises(ValueError, match="not on the image grid"):
        blend_evidence(display, np.zeros((4, 4)))


def test_monochrome1_sources_are_shown_inverted():
    source = pydicom.dcmread(get_testdata_file(SOURCES["CR MONOCHROME1"]))
    shown = source_frame(source)[..., 0]
    stored = source.pixel_array.astype(float)
    # the highest stored value (darkest in MONOCHROME1) is the darkest displayed pixel
    assert shown.flat[np.argmax(stored)] == shown.min()


def test_parametric_maps_hold_the_float_evidence_and_pass_dciodvfy(tmp_path, synthetic_sources):
    _, series = synthetic_sources
    writer = ParametricMapWriter(MODEL)
    cases = {"CT": [pydicom.dcmread(get_testdata_file("CT_small.dcm"))],
             "MR": [pydicom.dcmread(get_testdata_file("MR_small.dcm"))],
             "synthetic CT series": series}
    for kind, sources in cases.items():
        evidence = np.random.default_rng(1).standard_normal((len(sources), sources[0].Rows, sources[0].Columns))
        path = writer.write(tmp_path / f"{kind}.dcm", sources, evidence.squeeze(0) if len(sources) == 1 else evidence, "lesion")
        assert dicom_validation_errors(path) == [], kind
        pm = pydicom.dcmread(path)
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
    cr, _ = synthetic_sources
    with pytest.raises(ParametricMapNotApplicable, match="CR image has no Frame of Reference"):
        ParametricMapWriter(MODEL).build([cr], np.zeros((cr.Rows, cr.Columns)), "lesion")


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
