"""Writing in forked writer processes (bundle.inference.writing): the same outputs and completion records as
writing in this process, and a writer process that dies fails only the inputs it had in flight."""

from concurrent.futures.process import BrokenProcessPool

import pydicom
import pytest

from bundle.files import remove_partial_files
from bundle.inference.completion import CompletionRecords
from bundle.inference.writing import WriterPool
from bundle.synthetic import make_dataset
from bundle.writers import OverlayPngWriter, SecondaryCaptureWriter, StructuredReportWriter
from tests.plugin_writers import ProcessKillingWriter
from tests.test_writers import case_of


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = tmp_path_factory.mktemp("pool_sources")
    make_dataset(out, dims=2, n=3, seed=5, size=64)
    return sorted((out / "images").glob("*.dcm"))


def _write_all(sources, out, processes, writers):
    records = CompletionRecords(out, "signature")
    with WriterPool(writers, out, records, processes) as pool:
        futures = [pool.submit(case_of(path)) for path in sources]
        return [future.result() for future in futures], records


def test_writer_processes_write_what_one_thread_writes(sources, tmp_path):
    writers = [OverlayPngWriter(), SecondaryCaptureWriter(), StructuredReportWriter()]
    in_processes, records = _write_all(sources, tmp_path / "processes", 2, writers)
    in_thread, _ = _write_all(sources, tmp_path / "thread", 0, writers)
    assert in_processes == in_thread
    for (outputs, skipped), path in zip(in_processes, sources):
        assert set(outputs) == {"png", "sc", "sr"} and not skipped
        assert records.lookup(case_of(path).input) is not None  # recorded as complete by the worker
        report = pydicom.dcmread(tmp_path / "processes" / outputs["sr"][0])
        evidence = {item.ReferencedSOPInstanceUID for study in report.CurrentRequestedProcedureEvidenceSequence
                    for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
        capture = pydicom.dcmread(tmp_path / "processes" / outputs["sc"][0])
        assert capture.SOPInstanceUID in evidence  # the SR's writer process read what the SC writer wrote


def test_a_writer_process_that_dies_fails_its_input_and_a_fresh_pool_writes_the_rest(sources, tmp_path):
    doomed = sources[0].stem
    writers = [OverlayPngWriter(), ProcessKillingWriter(doomed)]
    records = CompletionRecords(tmp_path, "signature")
    with WriterPool(writers, tmp_path, records, 1) as pool:
        pool.submit(case_of(sources[2])).result()  # a pool's first input is written in this process, before the fork
        with pytest.raises(BrokenProcessPool):
            pool.submit(case_of(sources[0])).result()
        outputs, _ = pool.submit(case_of(sources[1])).result()
        assert (tmp_path / outputs["png"][0]).is_file()
    assert records.lookup(case_of(sources[0]).input) is None  # done again by the next run
    assert records.lookup(case_of(sources[1]).input) is not None
    # what it wrote before it died is whole (the overlay) or was never renamed into place
    assert [p.name for p in tmp_path.rglob(f"{doomed}*")] == [f"{doomed}.png"]
    assert remove_partial_files(tmp_path) == 0
