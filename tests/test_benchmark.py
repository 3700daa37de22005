"""The benchmark at tiny sizes (the report's structure, the figures with known answers, the GPU targets'
cases as a CPU dry run) and its report rendered from made-up results, whose statements must follow from
the figures. No wall time and no ratio target is asserted of a real run: they depend on the machine."""

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark as cli  # noqa: E402

from bundle.benchmark import cases, report as report_module, run  # noqa: E402
from bundle.benchmark.pipeline import parse_model_options, pipeline_models  # noqa: E402

TINY = {"backbone_kwargs": {"widen_factor": 0.25}}  # resnet10 at a quarter width: 128 feature channels
TINY_MODELS = {"resnet10, quarter width": {"role": "demo", "options": {"backbone": "resnet10", **TINY, "image_size": 32}}}


def tiny_setting(**options) -> cases.Setting:
    return cases.Setting("resnet10", 2, 32, batch_size=2, **TINY, **options)


def positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def report():
    """One whole run at 32^2 with one repeat: a backbone that does not exist (it must fail alone), the tiny
    resnet10 (Score-CAM run for real within the budget), and the GPU targets' two ResNet-50 stems as a CPU
    dry run (Score-CAM over the budget, so estimated); the pipeline with the tiny model on 4 DICOM files."""
    broken = cases.Setting("resnet7", 2, 32, batch_size=2)
    gpu_settings = run.gpu_target_settings("cpu", size=32, batch_size=2)
    return run.run_benchmark(
        [broken, tiny_setting(), *gpu_settings], repeats=1, budget_s=1.0, scorecam_budget_s=5.0, pipeline_images=4,
        pipeline_models=TINY_MODELS, pipeline_image_rows=64, augmentation_images=8, profiled=gpu_settings[1:], threads=1,
        log=lambda *a, **k: None,
    )


def rows_by_label(report) -> dict:
    return {r["label"]: r for r in report["settings"] if "error" not in r}


def test_a_setting_that_fails_is_reported_and_the_others_measured(report):
    broken = report["settings"][0]
    assert broken["label"] == "resnet7, 32^2" and "unknown backbone 'resnet7'" in broken["error"]
    assert set(rows_by_label(report)) == {"resnet10, widen_factor 0.25, 32^2", "resnet50, 32^2",
                                          "resnet50, conv1_t_stride 2, 32^2"}


def test_every_ratio_is_present_finite_and_positive(report):
    for row in rows_by_label(report).values():
        assert positive(row["forward"]["ratio"]) and positive(row["train"]["ratio"])
        assert set(row["maps"]["times_cheaper"]) == {"gradcam", "gradcampp", "layercam", "scorecam"}
        assert all(positive(v) for v in row["maps"]["times_cheaper"].values())
    (pipeline,) = report["pipeline"]["results"]
    assert all(positive(pipeline[k]) for k in ("ratio", "pipeline_images_per_s", "forward_images_per_s",
                                               "without_fsync_images_per_s"))
    assert positive(report["augmentation"][0]["images_per_s"])


def test_ratios_are_the_quotients_of_the_reported_times(report):
    row = rows_by_label(report)["resnet10, widen_factor 0.25, 32^2"]
    assert row["forward"]["ratio"] == row["forward"]["softcam"]["seconds"] / row["forward"]["linear"]["seconds"]
    assert row["train"]["ratio"] == row["train"]["softcam"]["seconds"] / row["train"]["linear"]["seconds"]
    softcam = row["maps"]["softcam"]["seconds_per_image"]
    for method, times in row["maps"]["times_cheaper"].items():
        assert times == pytest.approx(row["maps"][method]["seconds_per_image"] / softcam)
    for case in (*[row["forward"][h] for h in ("linear", "softcam")], *[row["train"][h] for h in ("linear", "softcam")]):
        assert case["images"] == 2 and case["images_per_s"] == pytest.approx(2 / case["seconds"])
    assert row["maps"]["scorecam"]["images"] == 1 and row["maps"]["scorecam"]["estimated"] is False


def test_scorecam_over_its_budget_is_estimated_from_the_forward_pass(report):
    row = rows_by_label(report)["resnet50, 32^2"]
    scorecam = row["maps"]["scorecam"]
    assert scorecam["estimated"] is True and scorecam["memory_mib"] is None and "calls" not in scorecam
    # 2,048 feature channels: one forward pass of the image and one per channel's masked image
    assert scorecam["seconds_per_image"] == pytest.approx(2049 * row["forward"]["linear"]["seconds_per_image"])


def test_every_case_has_its_own_memory_figure(report):
    row = rows_by_label(report)["resnet10, widen_factor 0.25, 32^2"]
    measured = [row["forward"]["linear"], row["forward"]["softcam"], row["train"]["linear"], row["train"]["softcam"],
                *[row["maps"][m] for m in ("softcam", "gradcam", "gradcampp", "layercam", "scorecam")]]
    for case in measured:  # on CPU each from a process of its own, with the allocator that returns freed memory
        assert case["memory_mib"] >= 0 and case["allocator"] == "glibc malloc, mmap threshold 64 KiB"
        assert case["feature_channels"] == 128
    assert report["pipeline"]["results"][0]["peak_mib"] > 0


def test_flops_follow_the_stem_and_the_training_step(report):
    rows = rows_by_label(report)
    default, torchvision = rows["resnet50, 32^2"], rows["resnet50, conv1_t_stride 2, 32^2"]
    assert default["feature_map"] == [2, 2] and torchvision["feature_map"] == [1, 1]  # 1/16 and 1/32 of the input
    # a stride-2 first convolution leaves every layer, itself included, a quarter of the positions
    assert default["gflop_per_image"]["forward"] / torchvision["gflop_per_image"]["forward"] == pytest.approx(4, rel=0.02)
    for row in rows.values():
        flops = row["gflop_per_image"]
        assert flops["forward"] > 0 and 2 < flops["train"] / flops["forward"] <= 3  # backward: about twice the forward
        assert 0 < flops["head"] < 0.01 * flops["forward"]
    assert default["gpu_target"] and torchvision["gpu_target"] and not rows["resnet10, widen_factor 0.25, 32^2"]["gpu_target"]


def test_profile_shares_add_up_and_name_the_top_ops(report):
    assert [p["case"] for p in report["profiles"]] == ["forward softcam", "train softcam"]
    for profile in report["profiles"]:
        shares = profile["shares"]
        assert all(0 <= v for v in shares.values()) and shares["convolutions"] > 0
        assert sum(shares.values()) == pytest.approx(1.0, abs=0.05)
        assert profile["top"] and profile["top"][0]["share"] >= profile["top"][-1]["share"]
    assert report["profiles"][1]["shares"]["optimiser"] > 0  # the training step's AdamW, found under Optimizer.step


def test_pipeline_stages_are_measured_with_their_fsync_time(report):
    (row,) = report["pipeline"]["results"]
    stages = row["stages_ms_per_image"]
    assert {"loading", "forward pass", "maps to the input grid", "completion record"} <= set(stages)
    writers = [name for name in stages if name.endswith(("(nifti)", "(png)", "(sc)"))]
    assert len(writers) == 3  # CR has no Frame of Reference: no Parametric Map
    for name in writers:
        assert 0 < stages[name]["fsync_ms"] < stages[name]["ms"] and stages[name]["cpu_ms"] > 0
    assert stages["forward pass"]["ms"] == round(1000 / row["forward_images_per_s"], 2)


def test_markdown_and_json_are_written(report, tmp_path):
    out = tmp_path / "benchmarks.md"
    report_module.write_report(out, report)
    text = out.read_text()
    for heading in ("## SoftCAM forward vs black-box forward", "## SoftCAM evidence maps vs post-hoc maps of the black box",
                    "## SoftCAM training step vs black-box training step", "## Inference: whole DICOM pipeline vs forward pass",
                    "## GPU targets", "## Where the time goes"):
        assert heading in text
    rows = [line for line in text.splitlines() if line.startswith("| resnet10, widen_factor 0.25, 32^2 |")]
    assert len(rows) == 4  # forward, maps, maps' memory, training
    assert "| resnet10, quarter width |" in text
    assert "- **not measured**: resnet7, 32^2: ValueError: unknown backbone 'resnet7'" in text
    assert "This run had no GPU" in text
    assert json.loads(out.with_suffix(".json").read_text()) == report  # the JSON file holds the whole report


# --- the report's statements, from made-up results ----------------------------------------------------------------


def made_up(**changes) -> dict:
    """A report as ``run_benchmark`` returns it, with round figures: one setting (the GPU targets' torchvision stem
    on a GPU), its data path, a profile and one pipeline row; ``changes`` patch it by path ("a.b.c": value)."""
    def pair(linear, softcam):
        return {"linear": {"images_per_s": linear, "seconds": 1 / linear, "memory_mib": 100.0},
                "softcam": {"images_per_s": softcam, "seconds": 1 / softcam, "memory_mib": 100.0},
                "ratio": linear / softcam, "memory_ratio": 1.0}

    setting = {"backbone": "resnet50", "spatial_dims": 2, "size": 224, "batch_size": 256, "device": "cuda",
               "amp_dtype": "bfloat16", "memory_format": "channels_last", "backbone_kwargs": {"conv1_t_stride": 2},
               "gpu_target": True}
    maps = {m: {"seconds_per_image": s, "memory_mib": 100.0 * s / 0.001, "estimated": m == "scorecam"}
            for m, s in {"softcam": 0.001, "gradcam": 0.002, "gradcampp": 0.002, "layercam": 0.002, "scorecam": 2.0}.items()}
    stage = {"ms": 1.0, "cpu_ms": 1.0, "fsync_ms": 0.0}
    report = {
        "date": "2030-01-01", "device": "NVIDIA H200", "machine": "x86_64", "cores": 16, "on_gpu": True,
        "load_average": {"start": [0.1, 0.1, 0.1], "end": [0.2, 0.2, 0.2]}, "minutes": 1.0, "python": "3.11",
        "torch": "2.13.0", "monai": "1.6", "torchcam": "0.5",
        "method": {"repeats": 20, "budget_s": 20.0, "scorecam_budget_s": 120.0, "scorecam_images": 1},
        "targets": run.TARGETS, "gpu_targets": run.GPU_TARGETS,
        "settings": [{"setting": setting, "label": "resnet50, conv1_t_stride 2, 224^2", "precision": "bfloat16 autocast",
                      "feature_channels": 2048, "gpu_target": True, "feature_map": [7, 7], "load_average": [0.1, 0.1, 0.1],
                      "gflop_per_image": {"forward": 8.0, "train": 24.0, "head": 0.001},
                      "forward": pair(12000.0, 12000.0), "train": pair(4000.0, 4000.0),
                      "maps": {**maps, "times_cheaper": {m: maps[m]["seconds_per_image"] / 0.001 for m in cases.POST_HOC}}}],
        "profiles": [{"case": "forward softcam", "setting": "resnet50, conv1_t_stride 2, 224^2", "timed": "GPU kernels",
                      "wall_s": 0.02, "images": 256, "top": [{"op": "sm90_xmma_fprop", "share": 0.6}],
                      "shares": {"convolutions": 0.8, "batch norm": 0.1, "optimiser": 0.0, "activations and adds": 0.05,
                                 "pooling": 0.0, "other ops": 0.05, "outside ops": 0.0}}],
        "augmentation": [{"input": "224^2", "images": 1024, "num_workers": 14, "images_per_s": 8000.0,
                          "train_images_per_s": {"resnet50, conv1_t_stride 2, 224^2": 4000.0}}],
        "pipeline": {"images": 512, "results": [{
            "role": "demo", "model": "resnet18, 128^2 (the demo's)", "pipeline_images_per_s": 50.0,
            "forward_images_per_s": 100.0, "ratio": 0.5, "without_fsync_images_per_s": 80.0, "batch_size": 8, "num_workers": 1, "writer_processes": 2,
            "torch_threads": 1, "cores": 2, "peak_mib": 700.0, "loader_worker_peak_mib": 500.0, "load_average": [1, 1, 1],
            "stages_ms_per_image": {"loading": {**stage, "ms": 10.0, "cpu_ms": 10.0}, "forward pass": {**stage, "ms": 10.0, "cpu_ms": 10.0},
                                    "maps to the input grid": dict(stage), "NiftiMapWriter (nifti)": dict(stage),
                                    "completion record": dict(stage)}}]},
    }
    for path, value in changes.items():
        *parents, key = path.split(".")
        node = report
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[key] = value
    return copy.deepcopy(report)


def statements(report: dict) -> str:
    return report_module.markdown(report)


def test_the_report_says_data_loading_bounds_training_when_it_is_slower_than_the_step():
    assert "the training step bounds training (4,000 images/s); the data path delivers 8,000" in statements(made_up())
    slow = made_up(**{"augmentation.0.images_per_s": 1000.0})
    text = statements(slow)
    assert "data loading bounds training: the augmentations deliver 1,000 images/s with 14 worker(s), the step takes 4,000" in text
    assert "training: data loading bounds it" in text and "the training step bounds training" not in text


def test_the_report_says_the_writers_bound_inference_when_their_lane_is_the_busiest():
    writers = made_up(**{"pipeline.results.0.stages_ms_per_image.NiftiMapWriter (nifti)":
                         {"ms": 40.0, "cpu_ms": 5.0, "fsync_ms": 30.0}})  # its lane: (35 + 1) / 2 processes
    text = statements(writers)
    assert "the writers bound inference" in text and "writing 41.0 ms of which 30.0 ms (73 %) waiting in fsync" in text
    assert "with every fsync skipped (measured only) the run reaches 80 images/s, so durability costs 38 %" in text
    forward = made_up(**{"pipeline.results.0.stages_ms_per_image.forward pass.cpu_ms": 40.0})
    assert "the forward pass and the model's thread bound inference" in statements(forward)
    loading = made_up(**{"pipeline.results.0.stages_ms_per_image.loading.cpu_ms": 80.0})
    assert "loading bound inference" in statements(loading)
    # on a CPU, every stage's CPU time over the cores: 10 + 10 + 30 + 1 + 1 = 52 ms over 2 cores, past each lane alone
    cores = made_up(on_gpu=False, **{"pipeline.results.0.stages_ms_per_image.NiftiMapWriter (nifti).cpu_ms": 30.0})
    assert "The busiest lane is the CPU cores (every stage's CPU time over 2 cores) at 26.0 ms" in statements(cores)
    assert "the CPU cores bound inference; the run took 20.0 ms per image, 0.8 times that" in statements(cores)
    # the forward pass takes 10 ms of the busiest lane's 26: the ratio cannot pass 0.385, short of the 0.5 target
    assert ("cannot pass 0.385 of the forward pass (its 10.0 ms per image over the busiest lane's 26.0 ms), so the 0.5 "
            "target is out of reach on this machine") in statements(cores)
    # the model's thread (10 ms forward, 1 ms maps) is the busiest lane: 0.909, above the target
    assert "cannot pass 0.909 of the forward pass (its 10.0 ms per image over the busiest lane's 11.0 ms)." in statements(made_up())


def test_the_pipeline_target_is_met_or_missed_by_the_measured_ratio():
    assert "runs at 0.500 of the forward pass, meeting the 0.5 target" in statements(made_up())
    below = made_up(**{"pipeline.results.0.ratio": 0.3})
    assert "runs at 0.300 of the forward pass, below the 0.5 target" in statements(below)
    full = made_up(**{"pipeline.results.0.role": "full width", "pipeline.results.0.ratio": 0.6})
    assert "below the 0.7 target" in statements(full)


def test_gpu_targets_are_compared_with_the_measured_rates():
    text = statements(made_up())
    assert "training: 4,000 images/s at batch 256 (96.00 TFLOP/s) meets the 3,000 images/s target" in text
    assert "inference with evidence maps: 12,000 images/s at batch 256 (96.00 TFLOP/s) meets the 10,000" in text
    slow = made_up(**{"settings.0.forward.softcam.images_per_s": 5000.0})
    assert "5,000 images/s at batch 256 (40.00 TFLOP/s) reaches 0.5 of the 10,000 images/s target" in statements(slow)
    assert "This run had no GPU" in statements(made_up(on_gpu=False))
    # 2 ms of writing per image (a writer, the record) in 2 processes: 1,000 images/s against 12,000 of the forward pass
    assert "2.0 ms per image, at most 1,000 images/s with 2 writer processes, against 12,000 images/s of the forward" in text
    assert "the writers bound it: keeping up with the forward pass would take 24 writer processes" in text


def test_the_profile_statement_follows_the_largest_share():
    assert "convolutions (80 % of its wall time) bound it" in statements(made_up())
    spread = {"convolutions": 0.3, "batch norm": 0.25, "optimiser": 0.0, "activations and adds": 0.2, "pooling": 0.05,
              "other ops": 0.1, "outside ops": 0.1}
    text = statements(made_up(**{"profiles.0.shares": spread}))
    assert "convolutions (30 % of its wall time) take the largest share, less than half: no one kind of op bounds it" in text


def test_timing_noise_is_named_only_when_the_head_cannot_explain_the_spread():
    assert "timing noise" not in statements(made_up())  # ratios exactly 1
    noisy = made_up(**{"settings.0.forward.ratio": 1.1})
    assert "more than the head's work can explain: the rest is timing noise" in statements(noisy)
    assert "above the 1.05 target: resnet50, conv1_t_stride 2, 224^2" in statements(noisy)


def test_no_fixed_conclusion_is_printed():
    text = statements(made_up())
    assert "the convolution kernels, not the head or the framework" not in text
    assert "Where the forward pass costs less than writing the outputs" not in text


# --- the command line -------------------------------------------------------------------------------------------


def test_the_demo_model_options_are_read_as_the_makefile_passes_them():
    options = parse_model_options("--backbone resnet18 --backbone_kwargs \"{'widen_factor': 0.25}\" --image_size 96")
    assert options == {"backbone": "resnet18", "backbone_kwargs": {"widen_factor": 0.25}, "image_size": 96}
    models = pipeline_models(options)
    assert [m["role"] for m in models.values()] == ["demo", "full width"]
    assert list(models) == ["resnet18, widen_factor 0.25, 96^2 (the demo's)", "resnet18, 96^2 (full width)"]
    assert models["resnet18, 96^2 (full width)"]["options"]["backbone_kwargs"] == {}
    with pytest.raises(ValueError, match="--key value pairs"):
        parse_model_options("--backbone")


def test_sizes_parse():
    assert cli.parse_size("224") == (2, 224)
    assert cli.parse_size("512^2") == (2, 512)
    assert cli.parse_size("96^3") == (3, 96)
    with pytest.raises(Exception):
        cli.parse_size("8^4")


def test_cuda_settings_follow_the_training_config():
    (setting,) = run.make_settings([(3, 96)], ["resnet50"], "cuda")
    assert setting.memory_format == "channels_last_3d" and setting.amp_dtype in ("bfloat16", "float16")
    assert setting.batch_size == run.CUDA_BATCH[(3, 96)]
    default, torchvision = run.gpu_target_settings("cuda")
    assert default.backbone_kwargs == {} and torchvision.backbone_kwargs == {"conv1_t_stride": 2}
    assert default.amp_dtype in ("bfloat16", "float16") and default.memory_format == "channels_last" and default.size == 224
    (cpu,) = run.make_settings([(2, 224)], ["resnet18"], "cpu")
    assert cpu.amp_dtype is None and cpu.memory_format is None and cpu.batch_size == 1


def test_mixed_precision_and_channels_last_cases_run():
    """The CUDA configuration's code path (autocast, channels_last) on the CPU, where bf16 autocast exists too."""
    setting = tiny_setting(amp_dtype="bfloat16", memory_format="channels_last")
    forward = cases.build_case(setting, "forward", "softcam")
    logits, maps = forward.call(forward.images)
    assert logits.dtype == torch.bfloat16 and maps.shape == (2, 2, 2, 2)
    assert forward.images.is_contiguous(memory_format=torch.channels_last)
    train = cases.build_case(setting, "train", "softcam")
    weight = train.network.head.class_evidence_layer.weight
    before = weight.detach().clone()
    train.call(train.images)
    assert weight.dtype == torch.float32 and not torch.equal(weight, before)  # the step updated the float32 weights
    for method in ("softcam", "gradcam", "gradcampp", "layercam", "scorecam"):
        explanation = cases.build_case(setting, "maps", method).call(cases.images(setting, 1))
        assert explanation.upsampled.shape == (1, 1, 32, 32) and torch.isfinite(explanation.upsampled).all()
