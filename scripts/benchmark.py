"""Benchmark SoftCAM against the black box it replaces, and the inference pipeline against its forward pass;
write docs/benchmarks.md (every statement computed from this run's figures) and the JSON report beside it.

    python scripts/benchmark.py [--device cpu|cuda] [--sizes 224 512 96^3] [--backbones resnet18 resnet50]
                                [--demo-model "--backbone resnet18 --backbone_kwargs \\"{'widen_factor': 0.125}\\" --output_stride 8"]
                                [--threads N] [--quick] [--out docs/benchmarks.md]
    python scripts/benchmark.py --gpu-targets [--device cuda]     # what `make bench-gpu` runs

- forward: SoftCAM ``forward_with_maps`` vs the black box's ``forward``; maps: SoftCAM's vs Grad-CAM, Grad-CAM++,
  LayerCAM, Score-CAM; training step: SoftCAM head vs linear head; peak memory, FLOPs and a profile of each;
- pipeline: configs/inference.json end to end vs its forward pass, with the demo's model (``--demo-model``, in
  the Makefile's DEMO_MODEL form) and the same network at full width, and what each stage costs per image;
- ``--gpu-targets``: ResNet-50 at 224^2 with the bundle's default stem and with the torchvision-equivalent one
  (``conv1_t_stride`` 2), in the training config's bf16 and channels_last on CUDA; with ``--sizes 32`` and
  ``--device cpu`` the same cases as a dry run.
See ``bundle.benchmark`` for how each is measured.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bundle.benchmark.pipeline import DEMO_MODEL, model_label, parse_model_options, pipeline_models  # noqa: E402
from bundle.benchmark.report import write_report  # noqa: E402
from bundle.benchmark.run import TORCHVISION_STEM, gpu_target_settings, make_settings, run_benchmark  # noqa: E402


def parse_size(text: str) -> tuple[int, int]:
    """"224" or "224^2" -> (2, 224); "96^3" -> (3, 96)."""
    size, _, power = text.partition("^")
    dims = int(power or 2)
    if dims not in (2, 3):
        raise argparse.ArgumentTypeError(f"{text!r}: give N (2D), N^2 or N^3")
    return dims, int(size)


def _given(value, default):
    return default if value is None else value


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=None, help="N or N^2 (2D), N^3 (3D); default 224 512 96^3")
    parser.add_argument("--backbones", nargs="+", default=None, help="default resnet18 resnet50")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default 1 on CPU; on CUDA 128 / 24 / 4 for 224^2 / 512^2 / 96^3")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds after the first (CPU 10, CUDA 20; the budget stops them sooner)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds per case after which no further call starts (CPU 5, CUDA 20)")
    parser.add_argument("--scorecam-budget", type=float, default=None, help="run Score-CAM when its estimate is below this "
                        "many seconds, else report the estimate (CPU 30, CUDA 120)")
    parser.add_argument("--images", type=int, default=None, help="DICOM images through the pipeline (default 64; --quick "
                        "16; --gpu-targets on CUDA 512)")
    parser.add_argument("--demo-model", default=DEMO_MODEL, help="the demo's model options as `monai.bundle run` takes "
                        "them (the Makefile's DEMO_MODEL); the pipeline runs it and the same network at full width")
    parser.add_argument("--image-rows", type=int, default=None, help="rows of the synthetic DICOM sources (default 256)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads per case (default: torch's, "
                        "one per core); 1 is steadier on a machine other work keeps busy")
    parser.add_argument("--quick", action="store_true", help="224^2 and ResNet-18 only, fewer pipeline images and repeats")
    parser.add_argument("--gpu-targets", action="store_true", help="the GPU targets' cases: ResNet-50 with both stems, "
                        "at 224^2 unless --sizes says otherwise, and the pipeline with the torchvision-equivalent stem")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    cuda = args.device.startswith("cuda")
    if args.gpu_targets:
        (dims, size), *_ = args.sizes or [(2, 224)]
        settings = gpu_target_settings(args.device, size, args.batch_size)
        resnet50 = {"backbone": "resnet50", "backbone_kwargs": TORCHVISION_STEM, "image_size": size}
        models = {model_label(resnet50): {"role": None, "options": resnet50}}
        profiled, images = settings, _given(args.images, 512 if cuda else 16)
    else:
        sizes = args.sizes or ([(2, 224)] if args.quick else [(2, 224), (2, 512), (3, 96)])
        backbones = args.backbones or (["resnet18"] if args.quick else ["resnet18", "resnet50"])
        settings = make_settings(sizes, backbones, args.device, args.batch_size)
        models = pipeline_models(parse_model_options(args.demo_model))
        profiled, images = None, _given(args.images, 16 if args.quick else 64)
    report = run_benchmark(
        settings, device=args.device,
        repeats=_given(args.repeats, 20 if cuda else (1 if args.quick else 10)),
        budget_s=_given(args.budget, 20.0 if cuda else 5.0),
        scorecam_budget_s=_given(args.scorecam_budget, 120.0 if cuda else 30.0),
        pipeline_images=images, pipeline_models=models, pipeline_image_rows=args.image_rows,
        augmentation_images=1024 if cuda else 32, profiled=profiled, threads=args.threads,
    )
    report["command"] = shlex.join(["python", "scripts/benchmark.py", *(argv if argv is not None else sys.argv[1:])])
    write_report(args.out, report)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')} in {report['minutes']} min")


if __name__ == "__main__":
    main()
