"""The statements docs/benchmarks.md makes, each computed from the report's figures: which stage bounds
training and inference, how targets compare with measured figures, where the time goes. A statement the
figures do not support is not made: every sentence here is chosen or filled in by a comparison."""

from __future__ import annotations

# Lanes of the inference pipeline: stages that run one after another in the same threads (per image)
MODEL = "the model's thread (the forward pass, the maps to the input grid)"
WRITING = "writing (writer processes: the writers, the completion record)"
# the stages before the writers (loading runs in DataLoader workers, the other two in the model's thread)
BEFORE_WRITING = ("loading", "forward pass", "maps to the input grid")


def rate(images_per_s: float) -> str:
    """Three significant figures, thousands separated."""
    return f"{images_per_s:.3g}" if images_per_s < 1000 else f"{images_per_s:,.0f}"


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}" if seconds < 10 else f"{seconds:,.0f} s"


def span(values: list[float], form: str = "{:.3f}") -> str:
    """"a to b" over the values, or the one value."""
    low, high = form.format(min(values)), form.format(max(values))
    return low if low == high else f"{low} to {high}"


def percent(share: float) -> str:
    return f"{100 * share:.0f} %" if share >= 0.01 else f"{100 * share:.2f} %"


def measured(report: dict) -> list[dict]:
    return [r for r in report["settings"] if "error" not in r]


def softcam_vs_black_box(report: dict) -> list[str]:
    """The forward and training time ratios against their targets, and whether the spread can be the head's."""
    rows = measured(report)
    targets = report["targets"]
    lines = []
    for kind, what in (("forward", "forward pass"), ("train", "training step")):
        ratios = [r[kind]["ratio"] for r in rows]
        over = [r["label"] for r in rows if r[kind]["ratio"] > targets[kind]]
        verdict = f"above the {targets[kind]} target: {', '.join(over)}" if over else f"all within the {targets[kind]} target"
        lines.append(f"SoftCAM / black-box time of the {what}: {span(ratios)} over {len(ratios)} setting(s), {verdict}.")
    head = max(r["gflop_per_image"]["head"] / r["gflop_per_image"]["forward"] for r in rows)
    spread = max(abs(r[k]["ratio"] - 1) for r in rows for k in ("forward", "train"))
    sentence = (f"SoftCAM's head is at most {percent(head)} of a forward pass's FLOPs; the ratios stray from 1 by up to "
                f"{percent(spread)}")
    if spread > 2 * head:
        sentence += ", more than the head's work can explain: the rest is timing noise (see the load average)"
    lines.append(sentence + ".")
    return lines


def where_time_goes(report: dict) -> list[str]:
    """The kind of op with the largest share of each profiled case; said to bound it only past half."""
    lines = []
    for p in report["profiles"]:
        largest = max(p["shares"], key=p["shares"].get)
        share = p["shares"][largest]
        verdict = "bound it" if share >= 0.5 else "take the largest share, less than half: no one kind of op bounds it"
        lines.append(f"{p['case']} ({p['setting']}): {largest} ({percent(share)} of its wall time) {verdict}; "
                     f"its top op is `{p['top'][0]['op']}` ({percent(p['top'][0]['share'])}).")
    rows = measured(report)
    for kind, what in (("forward", "SoftCAM's forward pass"), ("train", "SoftCAM's training step")):
        rates = [r["gflop_per_image"][kind] * r[kind]["softcam"]["images_per_s"] for r in rows]
        lines.append(f"{what} sustains {span(rates, '{:,.1f}')} GFLOP/s across the settings.")
    return lines


def post_hoc_maps(report: dict) -> list[str]:
    rows = measured(report)
    gradient = [r["maps"]["times_cheaper"][m] for r in rows for m in ("gradcam", "gradcampp", "layercam")]
    held = [r["maps"][m]["memory_mib"] / r["maps"]["softcam"]["memory_mib"] for r in rows
            for m in ("gradcam", "gradcampp", "layercam") if r["maps"]["softcam"]["memory_mib"] and r["maps"][m]["memory_mib"]]
    scorecam = [r["maps"]["times_cheaper"]["scorecam"] for r in rows]
    estimated = sum(r["maps"]["scorecam"].get("estimated", False) for r in rows)
    lines = [f"Grad-CAM, Grad-CAM++ and LayerCAM take {span(gradient, '{:.1f}')} times SoftCAM's time per map"
             + (f" and {span(held, '{:.1f}')} times its memory." if held else ".")]
    lines.append(f"Score-CAM takes {span(scorecam, '{:,.0f}')} times SoftCAM's time"
                 + (f" ({estimated} of {len(rows)} figures estimated from its definition)." if estimated else "."))
    return lines


def training_bounds(report: dict) -> list[str]:
    """Per input size: the training data path's rate against each training step's: the slower bounds training."""
    lines = []
    for entry in report["augmentation"]:
        for label, step in entry["train_images_per_s"].items():
            loading = entry["images_per_s"]
            if loading < step:
                lines.append(f"{label}: data loading bounds training: the augmentations deliver {rate(loading)} images/s "
                             f"with {entry['num_workers']} worker(s), the step takes {rate(step)}.")
            else:
                lines.append(f"{label}: the training step bounds training ({rate(step)} images/s); the data path "
                             f"delivers {rate(loading)} with {entry['num_workers']} worker(s), {loading / step:,.1f} times that.")
    return lines


def _busy(cost: dict) -> float:
    """A stage's own time per image: its CPU time and its waits in fsync, not the time other work on the
    machine took from it (wall where no CPU time was measured)."""
    return cost["ms"] if cost.get("cpu_ms") is None else cost["cpu_ms"] + cost["fsync_ms"]


def pipeline_lanes(row: dict, on_gpu: bool) -> dict[str, float]:
    """Milliseconds per image each lane of the pipeline needs (stages' own time: ``_busy``): stages in the same
    threads add up, processes of one kind share the work; on a CPU all stages also share the cores."""
    stages = row["stages_ms_per_image"]
    loading, forward = _busy(stages["loading"]), stages["forward pass"]
    model = forward["ms"] if on_gpu else _busy(forward) / min(row["torch_threads"], row["cores"])
    model += _busy(stages.get("maps to the input grid", {"ms": 0.0}))
    lanes = {MODEL: model + (loading if row["num_workers"] == 0 else 0.0),
             WRITING: writing_ms(stages) / max(1, row["writer_processes"])}
    if row["num_workers"]:
        lanes["loading (DataLoader workers)"] = loading / row["num_workers"]
    if not on_gpu:
        cpu = sum(c["cpu_ms"] for c in stages.values())
        lanes[f"the CPU cores (every stage's CPU time over {row['cores']} cores)"] = cpu / row["cores"]
    return lanes


def writing_ms(stages: dict) -> float:
    """What the writer processes spend per image (``_busy``): every writer and the completion record."""
    return sum(_busy(c) for name, c in stages.items() if name not in BEFORE_WRITING)


def pipeline_target(report: dict, row: dict) -> float | None:
    """The pipeline / forward rate a pipeline row should reach: the demo's model's, the full-width one's, or none."""
    role = row.get("role")
    return None if role is None else report["targets"]["pipeline full width" if role == "full width" else "pipeline"]


def inference_bounds(report: dict) -> list[str]:
    """Per model: the pipeline against its target, the stage costs, and the busiest lane, which bounds it."""
    lines = []
    for row in report["pipeline"]["results"]:
        target = pipeline_target(report, row)
        verdict = "no target for this model" if target is None else \
            f"meeting the {target} target" if row["ratio"] >= target else f"below the {target} target"
        stages = row["stages_ms_per_image"]
        writers = {k: v for k, v in stages.items() if k not in BEFORE_WRITING}
        writing, fsync = sum(c["ms"] for c in writers.values()), sum(c["fsync_ms"] for c in writers.values())
        lanes = pipeline_lanes(row, report["on_gpu"])
        busiest = max(lanes, key=lanes.get)
        took = 1000 / row["pipeline_images_per_s"]
        lines.append(
            f"{row['model']}: the pipeline runs at {row['ratio']:.3f} of the forward pass, {verdict}. Per image: loading "
            f"{stages['loading']['ms']:.1f} ms, the forward pass {stages['forward pass']['ms']:.1f} ms, writing "
            f"{writing:.1f} ms of which {fsync:.1f} ms ({percent(fsync / writing) if writing else 'n/a'}) waiting in fsync. "
            "The busiest lane is "
            f"{busiest} at {lanes[busiest]:.1f} ms per image (CPU and fsync time): {_bound_name(busiest)} bound "
            f"inference; the run took {took:.1f} ms per image, {took / lanes[busiest]:.1f} times that.")
        forward = stages["forward pass"]["ms"]
        if lanes[busiest] > forward:  # the pipeline takes at least the busiest lane's time per image
            ceiling = forward / lanes[busiest]
            lines.append(f"{row['model']}: with these stage costs the pipeline cannot pass {ceiling:.3f} of the forward "
                         f"pass (its {forward:.1f} ms per image over the busiest lane's {lanes[busiest]:.1f} ms)"
                         + (f", so the {target} target is out of reach on this machine." if target and ceiling < target
                            else "."))
        unsynced = row.get("without_fsync_images_per_s")
        if unsynced:
            cost = 1 - row["pipeline_images_per_s"] / unsynced
            lines.append(f"{row['model']}: with every fsync skipped (measured only) the run reaches {rate(unsynced)} images/s, "
                         + (f"so durability costs {percent(cost)} of the rate." if cost > 0 else
                            "no faster than with them: durability costs nothing measurable here."))
    return lines


def _bound_name(lane: str) -> str:
    return {MODEL: "the forward pass and the model's thread", WRITING: "the writers",
            "loading (DataLoader workers)": "loading"}.get(lane, "the CPU cores")


def _stem(row: dict) -> str:
    return "torchvision-equivalent stem" if row["setting"]["backbone_kwargs"] else "the bundle's default stem"


def gpu_targets(report: dict) -> list[str]:
    """The GPU targets' rows against the targets, the FLOPs of each stem, and what the measured rates need."""
    rows = [r for r in measured(report) if r.get("gpu_target")]
    if not rows:
        return ["ResNet-50 at 224^2 was not part of this run."]
    lines = [] if report["on_gpu"] else ["This run had no GPU: the figures are this CPU's, not comparable with the targets."]
    targets = report["gpu_targets"]
    for r in rows:
        gflop = r["gflop_per_image"]
        for kind, what in (("train", "training"), ("forward", "inference with evidence maps")):
            got = r[kind]["softcam"]["images_per_s"]
            verdict = "meets" if got >= targets[kind] else f"reaches {got / targets[kind]:.2g} of"
            lines.append(f"{r['label']} ({_stem(r)}), {what}: {rate(got)} images/s at batch {r['setting']['batch_size']} "
                         f"({got * gflop[kind] / 1000:,.2f} TFLOP/s) {verdict} the {targets[kind]:,} images/s target "
                         f"({targets[kind] * gflop[kind] / 1000:,.1f} TFLOP/s at this stem's {gflop[kind]:.1f} GFLOP per image).")
    stems = {bool(r["setting"]["backbone_kwargs"]): r["gflop_per_image"]["forward"] for r in rows}
    if len(stems) == 2:
        lines.append(f"MONAI's ResNet-50 as the bundle builds it takes {stems[False]:.1f} GFLOP per image forward at this "
                     f"size, {stems[False] / stems[True]:.1f} times the {stems[True]:.1f} GFLOP of the torchvision-equivalent "
                     "stem: at one sustained FLOP rate it runs that many times fewer images per second.")
    return lines


def gpu_bounds(report: dict) -> list[str]:
    """On the GPU targets' rows: the training step against the data path, the forward pass against the writers."""
    rows = [r for r in measured(report) if r.get("gpu_target")]
    lines = []
    for r in rows:
        size = f"{r['setting']['size']}^2"
        loading = next((a for a in report["augmentation"] if a["input"] == size), None)
        step = r["train"]["softcam"]["images_per_s"]
        if loading:
            bound = "data loading bounds" if loading["images_per_s"] < step else "the step, not data loading, bounds"
            lines.append(f"{r['label']} ({_stem(r)}), training: {bound} it (data path {rate(loading['images_per_s'])} "
                         f"images/s with {loading['num_workers']} workers, step {rate(step)}).")
        forward = r["forward"]["softcam"]["images_per_s"]
        for p in report["pipeline"]["results"]:
            per_image = writing_ms(p["stages_ms_per_image"])
            if not per_image:
                continue
            processes = min(p["writer_processes"], report.get("cores") or p["writer_processes"])  # one core each at most
            sustained = 1000 * processes / per_image
            if sustained < forward:
                verdict = (f"the writers bound it: keeping up with the forward pass would take "
                           f"{forward * per_image / 1000:,.0f} writer processes, each with a core")
            else:
                verdict = "the forward pass bounds it if the writers reach that rate"
            lines.append(f"{r['label']} ({_stem(r)}), inference with files written: writing {p['model']}'s outputs takes "
                         f"{per_image:.1f} ms per image, at most {rate(sustained)} images/s with {processes} writer "
                         f"processes, against {rate(forward)} images/s of the forward pass: {verdict} (the whole "
                         f"pipeline ran at {rate(p['pipeline_images_per_s'])} images/s in this run).")
    return lines
