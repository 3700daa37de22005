"""Measure inference throughput: the whole DICOM-to-outputs pipeline next to the forward pass alone.

Both run in one process on the same images and the same network, built from configs/inference.json
exactly as ``python -m monai.bundle run`` builds them. Writes docs/benchmarks.md and a JSON file.

    python scripts/benchmark.py [--images 64] [--device cpu|cuda] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai.bundle import ConfigWorkflow  # noqa: E402

from bundle.inference import InferenceDataset  # noqa: E402
from bundle.inputs import discover_inputs  # noqa: E402
from bundle.synthetic import make_dataset  # noqa: E402

MODELS = {
    "resnet18 (full width)": {"backbone": "resnet18", "backbone_kwargs": {}},
    "resnet18 (quarter width, the demo's)": {"backbone": "resnet18", "backbone_kwargs": {"widen_factor": 0.25}},
}


def inference_runner(input_dir: Path, output_dir: Path, ckpt: Path, device: str, **model):
    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs/inference.json"), meta_file=str(ROOT / "configs/metadata.json"),
        workflow_type="infer", bundle_root=str(ROOT), input_dir=str(input_dir), output_dir=str(output_dir),
        ckpt_path=str(ckpt), device=f"$torch.device('{device}')", inference_tracking=None, **model,
    )
    workflow.initialize()
    return workflow.parser.get_parsed_content("inference")


def forward_only(runner, input_dir: Path, batch_size: int, repeats: int) -> float:
    """Images per second of ``forward_with_maps`` on the preprocessed images, already in memory."""
    inputs, _ = discover_inputs(input_dir, runner.spatial_dims)
    dataset = InferenceDataset(inputs, runner.load, runner.prepare, runner.spatial_dims)
    images = torch.stack([dataset[i]["image"].as_tensor() for i in range(len(dataset))]).to(runner.device)
    runner.network.to(runner.device).eval()
    with torch.no_grad():
        runner.predict(images[:batch_size])  # warm-up
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            for i in range(0, len(images), batch_size):
                runner.predict(images[i : i + batch_size])
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
    return repeats * len(images) / (time.perf_counter() - start)


def pipeline(runner, warm_up: int = 8) -> float:
    """Images per second of the whole run (discover, decode, preprocess, forward, write every output)
    in steady state: a first run over ``warm_up`` of the images pays the one-off start-up costs
    (imports, kernel selection, first writer calls) that a long folder amortises."""
    input_dir, output_dir = runner.input_dir, runner.output_dir
    with tempfile.TemporaryDirectory() as warm:
        for path in sorted(input_dir.glob("*.dcm"))[:warm_up]:
            (Path(warm) / path.name).symlink_to(path)
        runner.input_dir, runner.output_dir = Path(warm), output_dir.with_name(output_dir.name + "-warm-up")
        runner.run()
    runner.input_dir, runner.output_dir = input_dir, output_dir
    start = time.perf_counter()
    results, _ = runner.run()
    return len(results) / (time.perf_counter() - start)


def output_costs(input_dir: Path, out: Path, count: int = 16) -> dict[str, float]:
    """Milliseconds per image of each output writer alone, single-threaded, on ``count`` sources."""
    import nibabel as nib
    import numpy as np
    import pydicom
    from PIL import Image

    from bundle.writers import ModelIdentity, SecondaryCaptureWriter
    from bundle.writers.secondary_capture import blend_evidence

    sources = [pydicom.dcmread(f) for f in sorted(input_dir.glob("*.dcm"))[:count]]
    writer = SecondaryCaptureWriter(ModelIdentity("benchmark", "0"))
    maps = [np.random.default_rng(0).random((ds.Rows, ds.Columns), dtype=np.float32) for ds in sources]
    costs = {}
    start = time.perf_counter()
    for ds, m in zip(sources, maps):
        writer.write(out / "sc.dcm", ds, m, 1, 0.5)
    costs["RGB Secondary Capture (render, highdicom build, save)"] = time.perf_counter() - start
    start = time.perf_counter()
    for m in maps:
        nib.save(nib.Nifti1Image(m.T, np.eye(4)), out / "map.nii.gz")
    costs["NIfTI map (.nii.gz)"] = time.perf_counter() - start
    start = time.perf_counter()
    for ds, m in zip(sources, maps):
        Image.fromarray(blend_evidence(np.zeros((128, 128, 3), np.float32), m[:128, :128])).save(out / "o.png")
    costs["PNG overlay"] = time.perf_counter() - start
    return {k: round(1000 * v / len(sources), 1) for k, v in costs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="passes of the forward-only timing")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_dataset(tmp / "data", dims=2, n=args.images, seed=11)
        for label, model in MODELS.items():
            from bundle.networks import classifier

            ckpt = tmp / "model.pt"
            torch.save(classifier(model["backbone"], backbone_kwargs=model["backbone_kwargs"]).state_dict(), ckpt)
            runner = inference_runner(tmp / "data" / "images", tmp / f"out-{len(rows)}", ckpt, args.device, **model)
            # the pipeline first: its run() loads the checkpoint the forward-only timing then uses
            full = pipeline(runner)
            forward = forward_only(runner, tmp / "data" / "images", runner.batch_size, args.repeats)
            rows.append({"model": label, "pipeline_images_per_s": round(full, 2),
                         "forward_images_per_s": round(forward, 2), "ratio": round(full / forward, 3),
                         "batch_size": runner.batch_size, "num_workers": runner.num_workers,
                         "writer_threads": runner.writer_threads})
            print(rows[-1], flush=True)
        costs = output_costs(tmp / "data" / "images", tmp)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    facts = {"date": time.strftime("%Y-%m-%d"), "device": device, "machine": platform.machine(),
             "python": platform.python_version(), "torch": torch.__version__, "images": args.images,
             "image": "synthetic CR DICOM, 256 rows, resized to 128 x 128", "results": rows,
             "output_ms_per_image": costs}
    args.out.with_suffix(".json").write_text(json.dumps(facts, indent=1))
    write_markdown(args.out, facts)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


def write_markdown(path: Path, facts: dict) -> None:
    lines = [
        "# Benchmarks",
        "",
        "Measured by `python scripts/benchmark.py` (figures side by side from one run; re-run it to refresh).",
        "",
        f"- date: {facts['date']}; device: {facts['device']}; torch {facts['torch']}; Python {facts['python']}",
        f"- inputs: {facts['images']} {facts['image']}",
        "- **pipeline**: `configs/inference.json` end to end: discover the folder, decode and preprocess in",
        "  DataLoader workers, forward pass with evidence maps, invert to the source grid, write NIfTI map,",
        "  PNG overlay, RGB Secondary Capture, predictions and failures tables (CR has no Parametric Map).",
        "- **forward only**: `forward_with_maps` + upsampling on the same preprocessed images held in memory.",
        "- both in steady state: the pipeline is timed on its second run (the first, on 8 of the images,",
        "  pays one-off start-up costs), the forward pass after one warm-up batch.",
        "",
        "## Inference: whole DICOM pipeline vs forward pass",
        "",
        "| model | pipeline (images/s) | forward only (images/s) | ratio | target | loader workers / writer threads |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in facts["results"]:
        lines.append(f"| {row['model']} | {row['pipeline_images_per_s']} | {row['forward_images_per_s']} | "
                     f"{row['ratio']} | >= 0.7 | {row['num_workers']} / {row['writer_threads']} |")
    lines += [
        "",
        "## What bounds the pipeline",
        "",
        "Each output writer alone, per image, single-threaded (same run):",
        "",
        "| output | ms per image |",
        "| --- | --- |",
        *[f"| {name} | {ms} |" for name, ms in facts["output_ms_per_image"].items()],
        "",
        "Writing runs in a thread pool beside the model, and decoding in DataLoader workers, so they overlap",
        "the forward pass; but on a CPU they share the same cores with it. Where the forward pass costs less",
        "than writing the outputs (a slim network), the writers bound the pipeline; the ratio improves as the",
        "model's share grows (full-width ResNet-18) and on a GPU, where the forward pass leaves the cores free.",
    ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
