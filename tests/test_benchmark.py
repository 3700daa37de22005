"""The benchmark script's measuring functions at tiny sizes: the report's structure and the figures that have
known answers. No wall time and no ratio target is asserted: they depend on the machine."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402

TINY = {"backbone_kwargs": {"widen_factor": 0.25}}  # resnet10 at a quarter width: 128 feature channels
TINY_MODELS = {"resnet10, quarter width": {"backbone": "resnet10", **TINY, "image_size": 32}}


def tiny_setting(**options) -> benchmark.Setting:
    return benchmark.Setting("resnet10", 2, 32, batch_size=2, **TINY, **options)


def positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def report():
    """One whole run at 32^2 with one repeat; Score-CAM run for real (its budget is generous); a second
    setting with a backbone that does not exist, which must fail alone."""
    broken = benchmark.Setting("resnet7", 2, 32, batch_size=2)
    return benchmark.run_benchmark(
        [broken, tiny_setting()], repeats=1, budget_s=2.0, scorecam_budget_s=600.0, pipeline_images=4,
        pipeline_models=TINY_MODELS, pipeline_image_rows=64, augmentation_images=8, threads=1,
    )


def measured(report) -> dict:
    (row,) = [r for r in report["settings"] if "error" not in r]
    return row


def test_a_setting_that_fails_is_reported_and_the_others_measured(report):
    broken, _ = report["settings"]
    assert broken["label"] == "resnet7, 32^2" and "unknown backbone 'resnet7'" in broken["error"]
    assert measured(report)["label"] == "resnet10, widen_factor 0.25, 32^2"


def test_every_ratio_is_present_finite_and_positive(report):
    row = measured(report)
    assert positive(row["forward"]["ratio"]) and positive(row["train"]["ratio"])
    assert set(row["maps"]["times_cheaper"]) == {"gradcam", "gradcampp", "layercam", "scorecam"}
    assert all(positive(v) for v in row["maps"]["times_cheaper"].values())
    assert row["maps"]["scorecam"]["estimated"] is False
    (pipeline,) = report["pipeline"]["results"]
    assert all(positive(pipeline[k]) for k in ("ratio", "pipeline_images_per_s", "forward_images_per_s"))
    assert all(positive(ms) for ms in report["pipeline"]["output_ms_per_image"].values())
    assert positive(report["augmentation"][0]["images_per_s"])


def test_ratios_are_the_quotients_of_the_reported_times(report):
    row = measured(report)
    assert row["forward"]["ratio"] == row["forward"]["softcam"]["seconds"] / row["forward"]["linear"]["seconds"]
    assert row["train"]["ratio"] == row["train"]["softcam"]["seconds"] / row["train"]["linear"]["seconds"]
    softcam = row["maps"]["softcam"]["seconds_per_image"]
    for method, times in row["maps"]["times_cheaper"].items():
        assert times == pytest.approx(row["maps"][method]["seconds_per_image"] / softcam)
    for case in (*[row["forward"][h] for h in ("linear", "softcam")], *[row["train"][h] for h in ("linear", "softcam")]):
        assert case["images"] == 2 and case["images_per_s"] == pytest.approx(2 / case["seconds"])
    assert row["maps"]["scorecam"]["images"] == 1  # Score-CAM on fewer images, reported per image


def test_every_case_has_its_own_memory_figure(report):
    row = measured(report)
    cases = [row["forward"]["linear"], row["forward"]["softcam"], row["train"]["linear"], row["train"]["softcam"],
             *[row["maps"][m] for m in ("softcam", "gradcam", "gradcampp", "layercam", "scorecam")]]
    for case in cases:  # on CPU each from a process of its own, with the allocator that returns freed memory
        assert case["memory_mib"] >= 0 and case["allocator"] == "glibc malloc, mmap threshold 64 KiB"
        assert case["feature_channels"] == 128
    assert report["pipeline"]["results"][0]["peak_mib"] > 0


def test_flops_of_a_training_step_are_two_to_three_forward_passes(report):
    flops = measured(report)["gflop_per_image"]
    assert flops["forward"] > 0 and 2 < flops["train"] / flops["forward"] <= 3  # backward: about twice the forward


def test_profile_shares_add_up_to_the_wall_time(report):
    for profile in report["profiles"]:
        shares = profile["shares"]
        assert set(shares) == {*benchmark.CATEGORIES, "other ops", "outside ops"}
        assert all(0 <= v for v in shares.values()) and shares["convolutions"] > 0
        assert sum(shares.values()) == pytest.approx(1.0, abs=0.05)
    assert report["profiles"][1]["shares"]["optimiser"] > 0  # the training step's AdamW, found under Optimizer.step


def test_markdown_and_json_are_written(report, tmp_path):
    out = tmp_path / "benchmarks.md"
    benchmark.write_report(out, report)
    text = out.read_text()
    for heading in ("## SoftCAM forward vs black-box forward", "## SoftCAM evidence maps vs post-hoc maps of the black box",
                    "## SoftCAM training step vs black-box training step", "## Inference: whole DICOM pipeline vs forward pass",
                    "## GPU targets", "## What bounds it"):
        assert heading in text
    rows = [line for line in text.splitlines() if line.startswith("| resnet10, widen_factor 0.25, 32^2 |")]
    assert len(rows) == 4  # forward, maps, maps' memory, training
    assert "| resnet10, quarter width |" in text
    assert "- **not measured**: resnet7, 32^2: ValueError: unknown backbone 'resnet7'" in text
    assert json.loads(out.with_suffix(".json").read_text()) == report  # the JSON file holds the whole report


def test_scorecam_over_its_budget_is_estimated_from_the_forward_pass():
    with benchmark.FreshProcesses(threads=1) as run:
        row = benchmark.measure_setting(tiny_setting(), run, repeats=1, budget_s=1.0, scorecam_budget_s=0.0,
                                        log=lambda *a, **k: None)
    scorecam = row["maps"]["scorecam"]
    assert scorecam["estimated"] is True and scorecam["memory_mib"] is None and "calls" not in scorecam
    # 128 feature channels: one forward pass of the image and one per channel's masked image
    assert scorecam["seconds_per_image"] == pytest.approx(129 * row["forward"]["linear"]["seconds_per_image"])


def test_cuda_settings_follow_the_training_config():
    (setting,) = benchmark.make_settings([(3, 96)], ["resnet50"], "cuda")
    assert setting.memory_format == "channels_last_3d" and setting.amp_dtype in ("bfloat16", "float16")
    assert setting.batch_size == benchmark.CUDA_BATCH[(3, 96)]
    (cpu,) = benchmark.make_settings([(2, 224)], ["resnet18"], "cpu")
    assert cpu.amp_dtype is None and cpu.memory_format is None and cpu.batch_size == 1


def test_mixed_precision_and_channels_last_cases_run():
    """The CUDA configuration's code path (autocast, channels_last) on the CPU, where bf16 autocast exists too."""
    setting = tiny_setting(amp_dtype="bfloat16", memory_format="channels_last")
    forward = benchmark.build_case(setting, "forward", "softcam")
    logits, maps = forward.call(forward.images)
    assert logits.dtype == torch.bfloat16 and maps.shape == (2, 2, 2, 2)
    assert forward.images.is_contiguous(memory_format=torch.channels_last)
    train = benchmark.build_case(setting, "train", "softcam")
    weight = train.network.head.class_evidence_layer.weight
    before = weight.detach().clone()
    train.call(train.images)
    assert weight.dtype == torch.float32 and not torch.equal(weight, before)  # the step updated the float32 weights
    for method in ("softcam", "gradcam", "gradcampp", "layercam", "scorecam"):
        explanation = benchmark.build_case(setting, "maps", method).call(benchmark._images(setting, 1))
        assert explanation.upsampled.shape == (1, 1, 32, 32) and torch.isfinite(explanation.upsampled).all()


def test_sizes_parse():
    assert benchmark.parse_size("224") == (2, 224)
    assert benchmark.parse_size("512^2") == (2, 512)
    assert benchmark.parse_size("96^3") == (3, 96)
    with pytest.raises(Exception):
        benchmark.parse_size("8^4")
