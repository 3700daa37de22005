"""docs/benchmarks.md from a run's report: how it was measured, one table per measurement, and the
statements of ``findings``, each computed from the same figures; the JSON report beside it."""

from __future__ import annotations

import json
from pathlib import Path

from bundle.benchmark import findings
from bundle.benchmark.cases import POST_HOC
from bundle.benchmark.findings import measured, ms, percent, rate
from bundle.benchmark.profiling import COLUMNS


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}" if value < 10 else f"{value:,.0f}"


def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f}"


def _bullets(sentences: list[str]) -> list[str]:
    return [f"- {s}" for s in sentences]


def write_report(path: Path, report: dict) -> None:
    """The markdown file at ``path`` and the whole report as JSON beside it (same name, .json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    path.write_text(markdown(report))


def markdown(report: dict) -> str:
    sections = [_header, _forward, _maps, _training, _pipeline, _gpu, _bounds]
    return "\n".join(line for section in sections for line in section(report)) + "\n"


def _header(report: dict) -> list[str]:
    rows = measured(report)
    method = report["method"]
    sizes = sorted({(r["setting"]["spatial_dims"], r["setting"]["size"]) for r in rows})
    allocator = next((r["forward"]["linear"].get("allocator") for r in rows), None)
    memory = (f"CPU: growth of the resident set's peak (`ru_maxrss`) in a fresh process per case ({allocator}, so freed "
              "tensors leave the resident set)" if allocator else
              "CUDA: `torch.cuda.max_memory_allocated` over `memory_allocated` before the call")
    load = report["load_average"]
    return [
        "# Benchmarks", "",
        f"Measured by `{report.get('command', 'python scripts/benchmark.py')}`: every figure and every statement below "
        "comes from this one run (re-run it to refresh; the JSON file beside this one holds all figures).", "",
        f"- date: {report['date']}; device: {report['device']}; load average (1/5/15 min) "
        f"{' / '.join(map(str, load['start']))} at the start, {' / '.join(map(str, load['end']))} at the end; "
        f"the run took {report['minutes']} min",
        f"- torch {report['torch']}, MONAI {report['monai']}, torchcam {report['torchcam']}, Python {report['python']}",
        f"- inputs: random images at {', '.join(f'{s}^{d}' for d, s in sizes)}, one channel; networks as "
        "`bundle.networks.classifier` builds them (MONAI ResNets; backbone options in each row's name); batch size and "
        "precision per row",
        "- timing: the cases compared (black box and SoftCAM forward; the five maps; the two training steps) run side by "
        "side in one fresh process: each warms up on a 32-pixel input, then rounds call every case once, in alternating "
        f"order, until {method['repeats']} rounds follow the first or another round would pass {method['budget_s']} s per "
        "case; a case's time is its fastest call after the first round (the first where that was the only one). Ratios "
        "are times, SoftCAM / reference.",
        f"- memory: what one call adds at its peak over the network, optimiser state and inputs in place, MiB; {memory}",
        *[f"- **not measured**: {r['label']}: {r['error']}" for r in report["settings"] if "error" in r],
    ]


PAIR_TABLE = [
    "| setting | batch | precision | black box (images/s) | SoftCAM (images/s) | time ratio | target "
    "| memory black box / SoftCAM (MiB) | memory ratio | GFLOP / image | SoftCAM GFLOP/s | load average |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]


def _pair_rows(report: dict, kind: str) -> list[str]:
    """Table rows for the black box and SoftCAM side by side, ``kind`` "forward" or "train"."""
    lines = []
    for row in measured(report):
        pair, gflop = row[kind], row["gflop_per_image"][kind]
        lines.append(
            f"| {row['label']} | {row['setting']['batch_size']} | {row['precision']} | {rate(pair['linear']['images_per_s'])} | "
            f"{rate(pair['softcam']['images_per_s'])} | **{pair['ratio']:.3f}** | <= {report['targets'][kind]} | "
            f"{_mib(pair['linear']['memory_mib'])} / {_mib(pair['softcam']['memory_mib'])} | {_x(pair['memory_ratio'])} | "
            f"{gflop:,.1f} | {gflop * pair['softcam']['images_per_s']:,.1f} | {' / '.join(map(str, row['load_average']))} |")
    return lines


def _forward(report: dict) -> list[str]:
    return ["", "## SoftCAM forward vs black-box forward", "",
            "SoftCAM `forward_with_maps` (logits and evidence maps) vs the black box's `forward` (logits), same backbone "
            "weights. GFLOP / image: what torch's `FlopCounterMode` counts for SoftCAM's forward pass (for the training "
            "step, its forward and backward passes); SoftCAM GFLOP/s: that times SoftCAM's images/s.", "",
            *PAIR_TABLE, *_pair_rows(report, "forward"), "", *_bullets(findings.softcam_vs_black_box(report))]


def _maps(report: dict) -> list[str]:
    method = report["method"]
    lines = ["", "## SoftCAM evidence maps vs post-hoc maps of the black box", "",
             "Milliseconds per image for the map of a given class through `bundle.explain.methods.make_explainer` (maps "
             "upsampled to the input, as every explainer returns them); for each post-hoc method, its time over SoftCAM's. "
             f"Score-CAM runs on {method['scorecam_images']} image(s); where its estimated cost passed "
             f"{method['scorecam_budget_s']} s it was not run and the figure (*est.*) is its definition's cost, D + 1 "
             "black-box forward passes per image (D feature channels) at the measured forward rate.", "",
             "| setting | SoftCAM (ms/image) | " + " | ".join(POST_HOC.values()) + " |",
             "| --- | --- | " + " | ".join("---" for _ in POST_HOC) + " |"]
    for r in measured(report):
        m = r["maps"]
        cells = [f"{m['times_cheaper'][k]:,.1f}x ({ms(m[k]['seconds_per_image'])}{' *est.*' if m[k].get('estimated') else ''})"
                 for k in POST_HOC]
        lines.append(f"| {r['label']} | {ms(m['softcam']['seconds_per_image'])} | " + " | ".join(cells) + " |")
    lines += ["", "Memory of each map's computation (MiB):", "",
              "| setting | SoftCAM | " + " | ".join(POST_HOC.values()) + " |",
              "| --- | --- | " + " | ".join("---" for _ in POST_HOC) + " |"]
    for r in measured(report):
        lines.append(f"| {r['label']} | " + " | ".join(_mib(r["maps"][k]["memory_mib"]) for k in ("softcam", *POST_HOC)) + " |")
    return lines + ["", *_bullets(findings.post_hoc_maps(report))]


def _training(report: dict) -> list[str]:
    lines = ["", "## SoftCAM training step vs black-box training step", "",
             "Forward, loss, backward and optimiser step with `configs/train.json`'s loss (`bundle.losses.classification_loss`: "
             "SoftCAM's ElasticNet-regularised cross-entropy vs cross-entropy) and AdamW, on a batch already in memory.", "",
             *PAIR_TABLE, *_pair_rows(report, "train"), "",
             "The training data path with cached preprocessing: the training config's random augmentations (flip, affine, "
             "contrast) through its DataLoader workers, next to the SoftCAM training step:", "",
             "| input | loader workers | augmentation (images/s) | SoftCAM training step (images/s) |", "| --- | --- | --- | --- |"]
    for a in report["augmentation"]:
        steps = ", ".join(f"{rate(r)} ({label})" for label, r in a["train_images_per_s"].items())
        lines.append(f"| {a['input']} | {a['num_workers']} | {rate(a['images_per_s'])} | {steps} |")
    return lines + ["", *_bullets(findings.training_bounds(report))]


def _pipeline(report: dict) -> list[str]:
    pipe = report["pipeline"]
    if not pipe["results"]:
        return []
    lines = ["", "## Inference: whole DICOM pipeline vs forward pass", "",
             f"- inputs: {pipe['images']} synthetic CR DICOM files",
             "- **pipeline**: `configs/inference.json` end to end (discover, decode and preprocess in DataLoader workers, "
             "forward pass with evidence maps and the maps back onto the source grid in one thread, every configured writer in "
             "forked writer processes, "
             "completion records, tables), timed on its second run (the first, on 8 of the images, pays one-off costs);",
             "- **forward only**: the run's `predict` (forward with maps, upsampled) on the same preprocessed images in memory;",
             "- **without fsync**: the pipeline again with the atomic writes' fsync calls skipped (measurement only);",
             "- **stages**: each stage alone, one after another in one thread, per image: wall ms (CPU ms: this thread's, "
             "the forward pass's all threads'; ms waiting in fsync, which every atomic write does twice: the file, then its "
             "folder).", "",
             "| model | pipeline (images/s) | forward only (images/s) | ratio | target | without fsync (images/s) "
             "| loader workers / writer processes | peak memory process / largest child (MiB) | load average |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in pipe["results"]:
        target = findings.pipeline_target(report, row)
        lines.append(f"| {row['model']} | {row['pipeline_images_per_s']} | {row['forward_images_per_s']} | **{row['ratio']}** "
                     f"| {'none' if target is None else f'>= {target}'} | {row.get('without_fsync_images_per_s', 'n/a')} "
                     f"| {row['num_workers']} / {row['writer_processes']} | "
                     f"{_mib(row['peak_mib'])} / {_mib(row['loader_worker_peak_mib'])} | {' / '.join(map(str, row['load_average']))} |")
    names = list(dict.fromkeys(name for row in pipe["results"] for name in row["stages_ms_per_image"]))
    lines += ["", "| stage (ms per image: wall (CPU; fsync)) | " + " | ".join(r["model"] for r in pipe["results"]) + " |",
              "| --- | " + " | ".join("---" for _ in pipe["results"]) + " |"]
    for name in names:
        cells = [_stage_cell(row["stages_ms_per_image"].get(name)) for row in pipe["results"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + ["", *_bullets(findings.inference_bounds(report))]


def _stage_cell(cost: dict | None) -> str:
    if cost is None:
        return "n/a"
    return f"{cost['ms']:.1f} ({cost['cpu_ms']:.1f}; {cost['fsync_ms']:.1f})"


def _gpu(report: dict) -> list[str]:
    lines = ["", "## GPU targets (ResNet-50, 224^2, bf16, one H100/H200, the torchvision-equivalent stem)", "",
             "`make bench-gpu` measures these rows on a CUDA machine: the bundle's default stem (first convolution at "
             "stride 1: feature maps 1/16 of the input) and the torchvision-equivalent stem (`--backbone_kwargs "
             "\"{'conv1_t_stride': 2}\"`: 1/32).", ""]
    return lines + _bullets(findings.gpu_targets(report)) + _bullets(findings.gpu_bounds(report))


def _bounds(report: dict) -> list[str]:
    lines = ["", "## Where the time goes", "",
             f"Share of wall time by kind of op (torch.profiler, one call after a warm-up; "
             f"{report['profiles'][0]['timed']} timed), and each case's top ops:", "",
             "| case | setting | wall (ms/call) | " + " | ".join(COLUMNS) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |"]
    for p in report["profiles"]:
        lines.append(f"| {p['case']} | {p['setting']} | {ms(p['wall_s'])} | "
                     + " | ".join(percent(p["shares"][c]) for c in COLUMNS) + " |")
    lines += ["", "| case | setting | top ops (share of wall time) |", "| --- | --- | --- |"]
    for p in report["profiles"]:
        lines.append(f"| {p['case']} | {p['setting']} | " + ", ".join(f"`{t['op']}` {percent(t['share'])}" for t in p["top"]) + " |")
    return lines + ["", *_bullets(findings.where_time_goes(report))]
