"""The benchmark behind docs/benchmarks.md: SoftCAM against the black box it replaces, all figures from one run.

- ``cases``: what is measured (a network at a size, precision and memory format; forward, maps, training step);
- ``harness``: how (side by side in fresh processes, interleaved calls, peak memory);
- ``profiling``: where the time goes (torch.profiler) and how fast the training data path is;
- ``pipeline``: the whole DICOM inference run next to its forward pass, and the cost of each of its stages;
- ``run``: one run of everything, returned as a plain dict (the JSON report);
- ``findings``: the statements the report makes, each computed from that dict's figures;
- ``report``: docs/benchmarks.md from the dict.

``python scripts/benchmark.py`` runs it; ``make bench-gpu`` runs the GPU targets' cases on a CUDA machine.
"""
