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


SLIM = {"widen_factor": 0.25}


@pytest.mark.parametrize("spatial_dims, size, native_cells", [(2, 128, 8), (3, 32, 2)])
def test_output_stride_8_gives_twice_the_evidence_cells_and_logits_stay_their_mean(spatial_dims, size, native_cells):
    x = torch.randn(2, 1, *[size] * spatial_dims)
    for output_stride, cells in ((None, native_cells), (16, native_cells), (8, 2 * native_cells), (4, 4 * native_cells)):
        model = classifier("resnet18", spatial_dims=spatial_dims, output_stride=output_stride, backbone_kwargs=SLIM).eval()
        assert model.features.native_stride == 16  # MONAI's ResNets at their default stem (conv1_t_stride 1 + max pool)
        with torch.no_grad():
            logits = model(x)
        assert model.evidence_maps.shape == (2, 2, *[cells] * spatial_dims)
        assert torch.allclose(logits, model.evidence_maps.flatten(2).mean(2), atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_native_output_stride_changes_nothing(spatial_dims):
    torch.manual_seed(0)
    default = classifier("resnet18", spatial_dims=spatial_dims, backbone_kwargs=SLIM).eval()
    torch.manual_seed(0)
    native = classifier("resnet18", spatial_dims=spatial_dims, output_stride=16, backbone_kwargs=SLIM).eval()
    assert {k: v.shape for k, v in default.state_dict().items()} == {k: v.shape for k, v in native.state_dict().items()}
    assert all(torch.equal(v, native.state_dict()[k]) for k, v in default.state_dict().items())
    assert str(default) == str(native)  # the same modules with the same strides, dilations and paddings
    x = torch.randn(2, 1, *[32] * spatial_dims)
    with torch.no_grad():
        assert torch.equal(default(x), native(x))


@pytest.mark.parametrize("backbone, spatial_dims, output_stride, options", [
    ("resnet18", 2, 8, {}),  # basic blocks
    ("resnet50", 2, 4, {"shortcut_type": "A"}),  # bottlenecks, pooling shortcut, two dilated stages
    ("resnet10", 3, 8, {}),
    ("resnet18", 3, 8, {"conv1_t_stride": 2}),  # a stride-2 stem: native 32, two dilated stages
])
def test_dilated_maps_sampled_at_the_native_stride_equal_the_native_maps(backbone, spatial_dims, output_stride, options):
    # Dilation adds no parameter: the native network's weights load as they are, and in eval mode the
    # dilated network computes the native map at every (native / output_stride)-th cell (the a trous identity).
    torch.manual_seed(3)
    native = classifier(backbone, spatial_dims=spatial_dims, backbone_kwargs={**SLIM, **options}).eval()
    dilated = classifier(backbone, spatial_dims=spatial_dims, output_stride=output_stride,
                         backbone_kwargs={**SLIM, **options}).eval()
    dilated.load_state_dict(native.state_dict())  # strict: same keys and shapes
    step = native.features.native_stride // output_stride
    x = torch.randn(2, 1, *[64] * spatial_dims)
    with torch.no_grad():
        native_maps, dilated_maps = native.forward_with_maps(x)[1], dilated.forward_with_maps(x)[1]
    assert dilated_maps.shape[2:] == tuple(step * s for s in native_maps.shape[2:])
    sampled = dilated_maps[(..., *[slice(None, None, step)] * spatial_dims)]
    assert torch.allclose(sampled, native_maps, rtol=1e-4, atol=1e-4 * native_maps.abs().max().item())
    assert not torch.allclose(dilated_maps.flatten(2).mean(2), native_maps.flatten(2).mean(2))  # finer, not the same


def test_output_strides_a_backbone_cannot_give_are_clear_errors():
    with pytest.raises(ValueError, match="densenet121.*output stride is 32"):
        classifier("densenet121", output_stride=8)
    with pytest.raises(ValueError, match=r"resnet18.*one of \[16, 8, 4, 2\]"):
        classifier("resnet18", output_stride=6)
    assert classifier("seresnet50", output_stride=32).features.output_stride == 32  # its own stride is fine
