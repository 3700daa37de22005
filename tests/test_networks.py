import pytest
import torch
from monai.networks import nets

from bundle.networks import BACKBONES, BackboneFeatures, ClassEvidenceHead, LinearHead, classifier


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_softcam_logits_are_the_spatial_mean_of_the_evidence_maps(backbone, spatial_dims):
    torch.manual_seed(0)
    model = classifier(backbone, spatial_dims=spatial_dims, in_channels=1, num_classes=3, head="softcam").eval()
    x = torch.randn(2, 1, *([32] * spatial_dims))
    with torch.no_grad():
        logits = model(x)
        maps = model.evidence_maps
    assert isinstance(model.head, ClassEvidenceHead)
    assert logits.shape == (2, 3)
    assert maps.shape[:2] == (2, 3) and maps.ndim == 2 + spatial_dims
    assert torch.allclose(logits, maps.flatten(2).mean(2), atol=1e-6)
    # the maps are those of the same forward pass: a second input gives other maps
    with torch.no_grad():
        model(torch.randn(1, 1, *([32] * spatial_dims)))
    assert model.evidence_maps.shape[0] == 1


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_black_box_baseline_comes_from_the_same_builder(spatial_dims):
    model = classifier("resnet18", spatial_dims=spatial_dims, head="linear").eval()
    assert isinstance(model.head, LinearHead)
    x = torch.randn(2, 1, *([32] * spatial_dims))
    with torch.no_grad():
        logits, cam = model.forward_with_maps(x)
    assert logits.shape == (2, 2)
    assert torch.allclose(logits, model(x), atol=1e-6)
    # for GAP + linear the class activation map averages to the logits exactly
    assert torch.allclose(logits, cam.flatten(2).mean(2), atol=1e-5)
    with pytest.raises(TypeError, match="no class evidence maps"):
        model.evidence_maps


def test_softcam_and_black_box_share_the_backbone_and_differ_only_in_the_head():
    soft = classifier("resnet18", head="softcam")
    black = classifier("resnet18", head="linear")
    assert soft.features.state_dict().keys() == black.features.state_dict().keys()
    assert set(soft.head.state_dict()) == {"class_evidence_layer.weight", "class_evidence_layer.bias"}
    assert set(black.head.state_dict()) == {"fc.weight", "fc.bias"}


def test_backbone_weights_load_from_a_local_monai_checkpoint(tmp_path):
    torch.manual_seed(1)
    monai_net = nets.resnet18(spatial_dims=2, n_input_channels=1, num_classes=7)
    path = tmp_path / "resnet18.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in monai_net.state_dict().items()}}, path)
    model = classifier("resnet18", head="softcam", backbone_weights=str(path)).eval()
    monai_net.eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        expected = monai_net.layer4(monai_net.layer3(monai_net.layer2(monai_net.layer1(
            monai_net.maxpool(monai_net.act(monai_net.bn1(monai_net.conv1(x))))))))
        assert torch.equal(model.features(x), expected)


def test_backbone_weights_of_another_network_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "densenet.pt"
    torch.save(nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=2).state_dict(), path)
    features = BackboneFeatures("resnet18")
    with pytest.raises(ValueError, match="densenet.pt"):
        features.load_weights(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        features.load_weights(tmp_path / "missing.pt")


def test_unknown_backbone_and_head_are_clear_errors():
    with pytest.raises(ValueError, match="unknown backbone"):
        classifier("vgg99")
    with pytest.raises(ValueError, match="unknown head"):
        classifier("resnet18", head="mlp")
