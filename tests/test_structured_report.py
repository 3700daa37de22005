"""The DICOM SR writer: a TID 1500 report per input that passes dciodvfy, keeps patient and study, references
the sources and the other outputs, and reads back (highdicom) as the class and the probabilities."""

import highdicom as hd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from bundle.inputs import InferenceInput
from bundle.writers import ModelIdentity, ParametricMapWriter, SecondaryCaptureWriter, StructuredReportWriter
from tests.conftest import dicom_validation_errors
from tests.test_writers import MODEL, case_of

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
LESION = ["52988006", "SCT", "Lesion"]


def write_all(case, folder, writers=None):
    """Run the DICOM writers over ``case`` in config order, as the inference loop does."""
    for writer in writers or (SecondaryCaptureWriter(), ParametricMapWriter(), StructuredReportWriter(class_codes={"lesion": LESION})):
        if not writer.skip_reason(case):
            case.written.setdefault(writer.kind, []).extend(writer.write(case, folder))
    return case


def read_report(path):
    """The predicted class (code) and the probabilities by class name, read back with highdicom."""
    sr = hd.sr.srread(path)
    (group,) = sr.content.get_image_measurement_groups()
    probabilities = {m.name.meaning.removeprefix("Probability of "): m.value for m in group.get_measurements()}
    return sr, group, probabilities


@pytest.mark.parametrize("name, probabilities", [("CT_small.dcm", (0.13, 0.87)), ("MR_small.dcm", (0.6, 0.4)),
                                                 ("dicomdirtests/77654033/CR1/6154", (0.25, 0.75))])
def test_the_report_names_the_finding_and_probabilities_and_references_the_sources_and_outputs(tmp_path, name,
                                                                                               probabilities):
    path = get_testdata_file(name)
    case = write_all(case_of(path, probabilities), tmp_path)
    (written,) = case.written["sr"]
    assert [written.path] == StructuredReportWriter().file_names(case)
    assert dicom_validation_errors(tmp_path / written.path) == []
    sr, group, read = read_report(tmp_path / written.path)
    assert (written.sop_class_uid, written.sop_instance_uid) == (SR_CLASS, sr.SOPInstanceUID)
    assert read == pytest.approx({"no lesion": probabilities[0], "lesion": probabilities[1]})
    finding = group.finding_type
    if probabilities[1] > probabilities[0]:  # a class with a standard code gets it
        assert (finding.value, finding.scheme_designator, finding.meaning) == tuple(LESION)
    else:
        assert (finding.value, finding.scheme_designator, finding.meaning) == ("CLASS0", "99SOFTCAM", "no lesion")
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99SOFTCAM"
    # same patient and study as the source, a series of its own
    source = pydicom.dcmread(path, stop_before_pixels=True)
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "AccessionNumber"):
        assert (sr.get(keyword) or None) == (source.get(keyword) or None), keyword
    assert sr.SeriesInstanceUID not in (source.SeriesInstanceUID, *(w.series_instance_uid for w in case.written["sc"]))
    # the algorithm, with its weights, and the source as the source of the measurements
    algorithm = sr.ContentSequence[-1].ContentSequence[0].ContentSequence
    texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.get("TextValue") for item in algorithm}
    assert texts["Algorithm Name"] == MODEL.name and texts["Algorithm Version"] == MODEL.version
    assert texts["Algorithm Parameters"] == f"weights {MODEL.weights_digest}"
    assert [ref.referenced_sop_instance_uid for ref in group.source_images] == [source.SOPInstanceUID]
    # the Secondary Capture and Parametric Map of the same input are the report's evidence, with the source
    evidence = {item.ReferencedSOPInstanceUID: item.ReferencedSOPClassUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence for series in study.ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence}
    outputs = {w.sop_instance_uid: w.sop_class_uid for kind in ("sc", "pm") for w in case.written.get(kind, [])}
    assert evidence == {source.SOPInstanceUID: source.SOPClassUID, **outputs}
    assert ("pm" in case.written) == (source.Modality != "CR")  # a CR has no Frame of Reference: no map
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert "RESEARCH USE ONLY" in sr.SeriesDescription


def test_writing_again_gives_the_same_uids_and_other_weights_other_ones(tmp_path):
    path = get_testdata_file("CT_small.dcm")
    first = write_all(case_of(path), tmp_path / "a").written["sr"][0]
    again = write_all(case_of(path), tmp_path / "b").written["sr"][0]
    assert (first.sop_instance_uid, first.series_instance_uid) == (again.sop_instance_uid, again.series_instance_uid)
    retrained = case_of(path)
    retrained.model = ModelIdentity(MODEL.name, MODEL.version, "ffff0000")
    other = write_all(retrained, tmp_path / "c").written["sr"][0]
    assert other.sop_instance_uid != first.sop_instance_uid


def test_a_source_without_patient_details_still_gets_a_valid_report(tmp_path):
    case = case_of(get_testdata_file("CT_small.dcm"))
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        del case.sources[0][keyword]
    (written,) = write_all(case, tmp_path, [SecondaryCaptureWriter(), StructuredReportWriter()]).written["sr"]
    assert dicom_validation_errors(tmp_path / written.path) == []
    sr = pydicom.dcmread(tmp_path / written.path)
    assert "PatientBirthDate" in sr and not sr.PatientBirthDate  # type 2: present and empty


def test_inputs_without_a_dicom_source_get_no_report():
    case = case_of(get_testdata_file("CT_small.dcm"))
    case.input, case.sources = InferenceInput("nifti", (case.input.files[0],)), []
    assert StructuredReportWriter().skip_reason(case) == "nifti inputs have no DICOM source: no Structured Report"
