"""TorchScript and the model zoo's checks: the networks script, and ``ckpt_export``, ``verify_net_in_out`` and
``verify_metadata`` pass through ``python -m monai.bundle``, offline."""

import copy
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from monai.data import load_net_with_metadata

from bundle.networks import classifier
from bundle.networks.sigmoid_branch import SigmoidBranchClassifier
from tests.conftest import ROOT, save_described_checkpoint

SCHEMA = ROOT / "configs" / "meta_schema_20240725.json"
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"  # MONAI's own record of the published file (its test data config)


def _monai_bundle(*args: str) -> subprocess.CompletedProcess:
    # a proxy that refuses every connection: a command that tried to download would fail
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=600)


# one backbone of each family (the ResNet depths share their family's code), both heads, and a 3D one
@pytest.mark.parametrize("backbone, options, spatial_dims, head", [
    ("resnet18", {"widen_factor": 0.25}, 2, "softcam"), ("resnet18", {"widen_factor": 0.25}, 2, "linear"),
    ("resnet10", {"widen_factor": 0.25}, 3, "softcam"), ("densenet121", {}, 2, "linear"),
    ("seresnet50", {}, 2, "softcam"), ("efficientnet-b0", {}, 2, "linear")])
def test_every_backbone_family_scripts_with_its_maps(backbone, options, spatial_dims, head):
    torch.manual_seed(0)
    model = classifier(backbone, spatial_dims=spatial_dims, head=head, backbone_kwargs=options).eval()
    scripted = torch.jit.script(copy.deepcopy(model))  # scripting puts the extractor into the tree it is given
    x = torch.rand(2, 1, *[32] * spatial_dims)
    with torch.no_grad():
        logits, maps = model.forward_with_maps(x)
        scripted_logits, scripted_maps = scripted.forward_with_maps(x)
        assert torch.allclose(scripted(x), logits, atol=1e-5)
    assert torch.allclose(scripted_logits, logits, atol=1e-5) and torch.allclose(scripted_maps, maps, atol=1e-5)
    assert set(scripted.state_dict()) == set(model.state_dict())  # the same parameter names as the checkpoint


def test_a_sigmoid_branch_model_scripts_with_both_heads():
    model = SigmoidBranchClassifier.from_classifier(classifier("resnet18", backbone_kwargs={"widen_factor": 0.25})).eval()
    scripted = torch.jit.script(copy.deepcopy(model))
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)
        assert torch.allclose(scripted(x, True), model(x, branch=True), atol=1e-5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = classifier("resnet10", head="softcam", backbone_kwargs={"widen_factor": 0.125})
    return save_described_checkpoint(net, tmp_path_factory.mktemp("export") / "model.pt", image_size=32), net


def test_ckpt_export_writes_a_torchscript_model_with_forward_and_forward_with_maps(checkpoint, tmp_path):
    path, net = checkpoint
    ts = tmp_path / "model.ts"
    result = _monai_bundle("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(path),
                           "--key_in_ckpt", "model", "--meta_file", "configs/metadata.json",
                           "--config_file", "configs/inference.json", "--ckpt_path", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    scripted, meta, extra = load_net_with_metadata(str(ts), more_extra_files=("inference.json",))
    assert meta["version"] == json.loads((ROOT / "configs/metadata.json").read_text())["version"]
    assert "network_def" in json.loads(extra["inference.json"])
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        logits, maps = net.eval().forward_with_maps(x)
        assert torch.allclose(scripted(x), logits, atol=1e-5)
        scripted_logits, scripted_maps = scripted.forward_with_maps(x)
    assert torch.allclose(scripted_logits, logits, atol=1e-5) and torch.allclose(scripted_maps, maps, atol=1e-5)


def test_verify_net_in_out_passes_for_the_training_and_the_inference_config(checkpoint):
    path, _ = checkpoint
    for config in (["--config_file", "configs/train.json", "--backbone_kwargs", "{'widen_factor': 0.125}"],
                   ["--config_file", "configs/inference.json", "--ckpt_path", str(path)]):
        result = _monai_bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                               "--device", "cpu", *config)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "data shape of network is verified with no error" in result.stdout + result.stderr


def test_verify_metadata_passes_offline_against_the_shipped_schema(tmp_path):
    assert hashlib.md5(SCHEMA.read_bytes()).hexdigest() == SCHEMA_MD5
    assert json.loads((ROOT / "configs/metadata.json").read_text())["schema"].endswith("/" + SCHEMA.name)
    result = _monai_bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(SCHEMA),
                           "--hash_val", SCHEMA_MD5)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "metadata is verified with no error" in result.stdout + result.stderr
    broken = json.loads((ROOT / "configs/metadata.json").read_text())
    del broken["network_data_format"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    refused = _monai_bundle("verify_metadata", "--meta_file", str(tmp_path / "broken.json"), "--filepath", str(SCHEMA),
                            "--hash_val", SCHEMA_MD5)
    assert refused.returncode != 0 and "'network_data_format' is a required property" in refused.stderr
