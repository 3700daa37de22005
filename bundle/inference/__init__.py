"""Run a trained classifier over a folder and write its evidence maps back out.

For every input found by ``bundle.inputs.discover_inputs``: a row in ``predictions.csv`` /
``predictions.json`` and the outputs of the writers listed in the config (``writers`` in
configs/inference.json; by default the evidence map of the predicted class as NIfTI on the input's
own grid, a PNG overlay, and for DICOM inputs an RGB Secondary Capture per image, slice or frame and,
where the source has a Frame of Reference, a Parametric Map of the float values; the maps are the
contrast maps by default, or the raw class evidence maps: ``evidence_map``). A bad input becomes
a row in ``failures.csv`` and the run goes on; the exit status says whether any failed. A rerun into
the same output folder skips the inputs an interrupted run finished.

Where things are:

- ``bundle.inputs``: input discovery (files, series, frames; unusable files);
- ``dataset``: loading one input in a DataLoader worker, decoded once for the model and the writers;
- ``loop``: the run loop (batches, the forward pass, the maps back on each input's grid);
- ``writing``: the writers of each input, in forked writer processes;
- ``runner``: ``EvidenceInference``, what the config builds: settings, the model, ``predict``;
- ``completion``: the per-input completion records that let a rerun resume;
- ``tables``: predictions and failures tables, and the summary tracking receives;
- ``sharding``: torchrun (``configs/multi_gpu_inference.json``): a shard per process, one set of tables;
- ``bundle.writers``: the writer plug-ins.
"""

from bundle.inference.dataset import InferenceDataset
from bundle.inference.runner import EvidenceInference
from bundle.inference.tables import InferenceResult, InferenceSummary, InputsFailed

__all__ = ["EvidenceInference", "InferenceDataset", "InferenceResult", "InferenceSummary", "InputsFailed"]
