"""Self-describing checkpoints: what model.pt says about itself, and every consumer built from it alone."""

import csv
import os

import pytest
import torch
from monai.bundle import ConfigParser

from bundle.checkpoints import network_for_checkpoint, read_description, trained_setting
from bundle.data import datalist_digest
from bundle.explain.compare import ExplanationComparison
from bundle.networks import classifier
from bundle.networks.sigmoid_branch import SigmoidBranchClassifier, sigmoid_branch_classifier
from tests.conftest import ROOT, run_bundle, save_described_checkpoint

# not the training config's defaults, so nothing passes by falling back on them
OPTIONS = {"backbone": "resnet10", "head": "linear", "num_classes": 3,
           "backbone_kwargs": {"widen_factor": 0.125, "conv1_t_stride": 2}, "output_stride": 8}
CLASSES = {0: "normal", 1: "benign", 2: "malignant"}


def described(tmp_path, name="model.pt", **options):
    torch.manual_seed(0)
    net = classifier(**{**OPTIONS, **options})
    return save_described_checkpoint(net, tmp_path / name, image_size=32, window=[40, 400], class_names=CLASSES,
                                      model_name="resnet10-linear"), net


def test_the_description_holds_the_network_preprocessing_classes_and_datalist(tmp_path):
    path, _ = described(tmp_path)
    description = read_description(path)
    assert description["network"] == {"backbone": "resnet10", "spatial_dims": 2, "in_channels": 1, "num_classes": 3,
                                      "head": "linear", "backbone_kwargs": {"widen_factor": 0.125, "conv1_t_stride": 2},
                                      "output_stride": 8}
    assert description["preprocessing"] == {"image_size": 32, "window": [40, 400]}
    assert description["class_names"] == {"0": "normal", "1": "benign", "2": "malignant"}
    assert description["model_name"] == "resnet10-linear" and description["bundle_version"] == "0.2.0"
    assert description["sigmoid_branch"] is False and len(description["datalist_digest"]) == 32
    torch.save(classifier().state_dict(), tmp_path / "bare.pt")
    assert read_description(tmp_path / "bare.pt") is None  # a checkpoint from before descriptions
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read the checkpoint .*junk.pt"):
        read_description(tmp_path / "junk.pt")


def test_the_network_is_built_from_the_checkpoint_alone_and_a_contradiction_names_both_values(tmp_path):
    path, trained = described(tmp_path)
    network = network_for_checkpoint(path)
    network.load_state_dict(torch.load(path, weights_only=True)["model"])  # strict: every key and shape fits
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(network.eval()(x), trained.eval()(x))
    assert network_for_checkpoint(path, backbone="resnet10", image_size=32, window=(40, 400)) is not None  # agreeing
    with pytest.raises(ValueError, match=r"backbone 'resnet18' contradicts the checkpoint .*model.pt, which was "
                                         r"trained with backbone 'resnet10'"):
        network_for_checkpoint(path, backbone="resnet18")
    with pytest.raises(ValueError, match=r"image_size 64 contradicts .* image_size 32"):
        network_for_checkpoint(path, image_size=64)
    with pytest.raises(ValueError, match="sigmoid_branch True contradicts"):
        network_for_checkpoint(path, branch=True)


def test_old_bare_checkpoints_still_load_with_the_given_settings(tmp_path):
    torch.save(classifier(**OPTIONS).state_dict(), tmp_path / "bare.pt")
    network = network_for_checkpoint(tmp_path / "bare.pt", image_size=32, window=None, **OPTIONS)
    network.load_state_dict(torch.load(tmp_path / "bare.pt", weights_only=True))
    assert trained_setting(tmp_path / "bare.pt", "backbone", "resnet18") == "resnet18"  # the fallback
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        trained_setting(tmp_path / "absent.pt", "backbone")


def test_compared_checkpoints_must_agree_and_missing_ones_are_passed_over(tmp_path):
    first, _ = described(tmp_path / "a")
    second, _ = described(tmp_path / "b", backbone="resnet18")
    assert trained_setting([first, tmp_path / "missing.pt"], "backbone") == "resnet10"
    assert trained_setting([first, second], "image_size") == 32
    with pytest.raises(ValueError, match="different backbone"):
        trained_setting([first, second], "backbone")


def test_the_datalist_digest_does_not_depend_on_where_the_data_lies(tmp_path):
    def datalist(root, label=1):
        return {"training": [{"image": f"{root}/images/a.dcm", "label": label}], "validation": []}

    assert datalist_digest(datalist("/data/x"), "/data/x") == datalist_digest(datalist("/mnt/y"), "/mnt/y")
    assert datalist_digest(datalist("/data/x"), "/data/x") != datalist_digest(datalist("/data/x", 0), "/data/x")


def test_the_sigmoid_branch_takes_its_baseline_from_the_checkpoint_alone(tmp_path):
    path, trained = described(tmp_path)
    model = sigmoid_branch_classifier(path)
    assert isinstance(model, SigmoidBranchClassifier)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict().items())
    with pytest.raises(ValueError, match="head 'softcam' contradicts"):
        sigmoid_branch_classifier(path, head="softcam")
    # the config: --baseline_ckpt alone sets the network, the image size and the model name
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs/train.json"), str(ROOT / "configs/train_sigmoid_branch.json")])
    parser.update({"bundle_root": str(ROOT), "baseline_ckpt": str(path)})
    assert parser.get_parsed_content("image_size") == 32
    assert parser.get_parsed_content("model_name") == "resnet10-linear-sigmoid-branch"
    assert isinstance(parser.get_parsed_content("network_def").branch.fc, torch.nn.Linear)
    # a branch model's own checkpoint says it is one: inference and the comparison build it as such
    branch_path = save_described_checkpoint(model, tmp_path / "branch.pt", image_size=32)
    assert isinstance(network_for_checkpoint(branch_path), SigmoidBranchClassifier)


def test_the_comparison_builds_each_model_from_its_checkpoint(tmp_path):
    black_box, _ = described(tmp_path / "linear")
    softcam, _ = described(tmp_path / "softcam", head="softcam")
    models = {"black box": {"head": "linear", "checkpoint": str(black_box)},
              "SoftCAM": {"head": "softcam", "checkpoint": str(softcam)},
              "mislabelled": {"head": "softcam", "checkpoint": str(black_box)}}
    comparison = ExplanationComparison(None, models, {"backbone": None, "backbone_kwargs": None}, str(tmp_path))
    assert comparison.load_model("black box").head.fc.out_features == 3
    assert comparison.load_model("SoftCAM").head.class_evidence_layer.out_channels == 3
    with pytest.raises(ValueError, match="head 'softcam' contradicts the checkpoint .*linear"):
        comparison.load_model("mislabelled")
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs/train.json"), str(ROOT / "configs/compare.json")])
    parser.update({"bundle_root": str(ROOT), "compare_models": models})
    assert (parser.get_parsed_content("image_size"), parser.get_parsed_content("window")) == (32, [40, 400])
    assert parser.get_parsed_content("backbone_kwargs") == OPTIONS["backbone_kwargs"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from bundle.synthetic import make_dataset

    out = tmp_path_factory.mktemp("few_images")
    make_dataset(out, dims=2, n=3, seed=5, size=48)
    return out / "images"


def _infer(images, out, ckpt, *extra):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return run_bundle("--config_file", "configs/inference.json", "--input_dir", str(images), "--output_dir", str(out),
                      "--ckpt_path", str(ckpt), "--num_workers", "0", "--inference_tracking", "$None", *extra, env=env)


def test_inference_needs_only_the_checkpoint_and_refuses_a_contradicting_flag(images, tmp_path):
    path, _ = described(tmp_path)
    result = _infer(images, tmp_path / "out", path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {r["model"] for r in rows} == {"resnet10-linear"}
    assert {"p_normal", "p_benign", "p_malignant"} <= set(rows[0])  # the checkpoint's class names
    refused = _infer(images, tmp_path / "refused", path, "--backbone", "resnet18")
    assert refused.returncode != 0
    assert "backbone 'resnet18' contradicts the checkpoint" in refused.stderr and "backbone 'resnet10'" in refused.stderr
