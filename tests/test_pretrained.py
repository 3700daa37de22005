"""Backbone weights from torchvision ResNet and MedicalNet checkpoints, with their real key names and shapes.

The checkpoints are written from the published architectures (torchvision's ``resnet.py``,
MedicalNet's ``models/resnet.py``), not from MONAI's network, so a naming or shape difference
between them and the bundle's backbone would show here.
"""

import pytest
import torch

from bundle.networks import BackboneFeatures, classifier
from bundle.networks.pretrained import detect_format, map_state, resnet_depth

ARCHITECTURES = {10: ("basic", [1, 1, 1, 1]), 18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]),
                 50: ("bottleneck", [3, 4, 6, 3]), 101: ("bottleneck", [3, 4, 23, 3]),
                 152: ("bottleneck", [3, 8, 36, 3])}
STEM = {"conv1_t_stride": 2}  # torchvision's and MedicalNet's 7x7 stride-2 convolution (+ max pooling, MONAI's default)


def batch_norm(prefix: str, channels: int) -> dict:
    return {f"{prefix}.{name}": (channels,) for name in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()}


def resnet_shapes(depth: int, dims: int = 2, in_channels: int = 3, shortcut: str = "B") -> dict:
    """Key -> shape of a torchvision (dims 2) or MedicalNet (dims 3) ResNet's backbone, without its head."""
    block, layers = ARCHITECTURES[depth]
    k = lambda n: (n,) * dims  # noqa: E731
    shapes = {"conv1.weight": (64, in_channels, *k(7)), **batch_norm("bn1", 64)}
    inplanes = 64
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for b in range(blocks):
            p = f"layer{i}.{b}"
            if block == "basic":
                out = planes
                shapes |= {f"{p}.conv1.weight": (planes, inplanes, *k(3)), **batch_norm(f"{p}.bn1", planes),
                           f"{p}.conv2.weight": (planes, planes, *k(3)), **batch_norm(f"{p}.bn2", planes)}
            else:
                out = planes * 4
                shapes |= {f"{p}.conv1.weight": (planes, inplanes, *k(1)), **batch_norm(f"{p}.bn1", planes),
                           f"{p}.conv2.weight": (planes, planes, *k(3)), **batch_norm(f"{p}.bn2", planes),
                           f"{p}.conv3.weight": (out, planes, *k(1)), **batch_norm(f"{p}.bn3", out)}
            if b == 0 and (i > 1 or inplanes != out) and shortcut == "B":  # projection shortcut, no bias
                shapes |= {f"{p}.downsample.0.weight": (out, inplanes, *k(1)), **batch_norm(f"{p}.downsample.1", out)}
            inplanes = out
    return shapes


def torchvision_shapes(depth: int) -> dict:
    return resnet_shapes(depth) | {"fc.weight": (1000, 512 * (4 if depth >= 50 else 1)), "fc.bias": (1000,)}


def medicalnet_shapes(depth: int) -> dict:
    """MedicalNet's released checkpoints: ResNet-18/34 with shortcut A, the rest B; conv_seg head (2 classes)."""
    shapes = resnet_shapes(depth, dims=3, in_channels=1, shortcut="A" if depth in (18, 34) else "B")
    width = 512 * (4 if depth >= 50 else 1)
    return shapes | {"conv_seg.0.weight": (width, 32, 2, 2, 2), "conv_seg.0.bias": (32,), **batch_norm("conv_seg.1", 32),
                     "conv_seg.3.weight": (32, 32, 3, 3, 3), **batch_norm("conv_seg.4", 32),
                     "conv_seg.6.weight": (2, 32, 1, 1, 1)}


def random_state(shapes: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def tensor(key, shape):
        if key.endswith("num_batches_tracked"):
            return torch.randint(0, 1000, shape, generator=g)
        if key.endswith("running_var"):
            return torch.rand(shape, generator=g) + 0.5
        fan_in = torch.Size(shape[1:]).numel() if len(shape) > 1 else 1  # He-like scale: activations stay finite
        return torch.randn(shape, generator=g) * (2 / fan_in) ** 0.5

    return {k: tensor(k, s) for k, s in shapes.items()}


def test_the_architectures_have_torchvisions_tensor_counts():
    # torchvision's resnet18 / resnet50 state dicts hold 122 / 320 tensors (num_batches_tracked included)
    assert len(torchvision_shapes(18)) == 122 and len(torchvision_shapes(50)) == 320
    assert len(torchvision_shapes(101)) == 626 and len(torchvision_shapes(152)) == 932


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_every_torchvision_resnet_maps_onto_monais(depth):
    state = {k: torch.empty(s, device="meta") for k, s in torchvision_shapes(depth).items()}
    assert detect_format(state) == "torchvision" and resnet_depth(state) == f"resnet{depth}"
    with torch.device("meta"):  # shapes only: no memory, no time
        features = BackboneFeatures(f"resnet{depth}", spatial_dims=2, in_channels=3, **STEM)
    mapped = map_state(features, state, "torchvision", "weights.pth")
    own = features.net.state_dict()
    assert mapped.keys() == own.keys() and all(mapped[k].shape == own[k].shape for k in own)


@pytest.mark.parametrize("depth", [10, 18, 34, 50, 101, 152])
def test_every_medicalnet_resnet_maps_onto_monais(depth):
    state = {k: torch.empty(s, device="meta") for k, s in medicalnet_shapes(depth).items()}
    assert detect_format(state) == "medicalnet" and resnet_depth(state) == f"resnet{depth}"
    shortcut = {"shortcut_type": "A"} if depth in (18, 34) else {}
    with torch.device("meta"):
        features = BackboneFeatures(f"resnet{depth}", spatial_dims=3, in_channels=1, **STEM, **shortcut)
    mapped = map_state(features, state, "medicalnet", "resnet.pth")
    own = features.net.state_dict()
    assert mapped.keys() == own.keys() and all(mapped[k].shape == own[k].shape for k in own)


def check_loaded(features: BackboneFeatures, source: dict, head: str, summed: bool = False) -> None:
    """Every source tensor (but the head) is where it belongs; the rest are zero downsample biases."""
    loaded = features.net.state_dict()
    for key, value in source.items():
        if key.startswith(head):
            continue
        expected = value.sum(dim=1, keepdim=True) if summed and key == "conv1.weight" else value
        assert torch.equal(loaded[key], expected.to(loaded[key].dtype)), key
    rest = set(loaded) - set(source)
    assert rest and all(k.endswith("downsample.0.bias") for k in rest)
    assert all(torch.count_nonzero(loaded[k]) == 0 for k in rest)


def test_torchvision_resnet18_loads_tensor_for_tensor_and_sums_rgb_for_grey(tmp_path):
    source = random_state(torchvision_shapes(18))
    torch.save(source, tmp_path / "resnet18-f37072fd.pth")
    rgb = BackboneFeatures("resnet18", in_channels=3, **STEM)
    rgb.load_weights(tmp_path / "resnet18-f37072fd.pth")
    check_loaded(rgb, source, "fc.")
    model = classifier("resnet18", in_channels=1, backbone_weights=str(tmp_path / "resnet18-f37072fd.pth"),
                       backbone_kwargs=STEM)
    check_loaded(model.features, source, "fc.", summed=True)
    # the summed convolution sees a grey image as the RGB network sees the same grey in three channels
    rgb.eval(), model.eval()
    grey = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        seen, expected = model.features(grey), rgb(grey.expand(-1, 3, -1, -1))
    assert seen.isfinite().all() and expected.abs().max() > 1
    assert (seen - expected).abs().max() <= 1e-5 * expected.abs().max()  # float32 summation order only


def test_torchvision_resnet50_bottlenecks_and_an_old_checkpoint_without_batch_counts(tmp_path):
    source = {k: v for k, v in random_state(torchvision_shapes(50), seed=1).items()
              if not k.endswith("num_batches_tracked")}  # as torchvision's 2017 resnet50-19c8e357.pth
    assert len(source) == 267
    torch.save(source, tmp_path / "resnet50.pth")
    features = BackboneFeatures("resnet50", in_channels=1, **STEM)
    features.load_weights(tmp_path / "resnet50.pth")
    loaded = features.net.state_dict()
    assert all(torch.equal(loaded[k], v.sum(1, keepdim=True) if k == "conv1.weight" else v)
               for k, v in source.items() if not k.startswith("fc."))
    assert all(int(v) == 0 for k, v in loaded.items() if k.endswith("num_batches_tracked"))


def test_medicalnet_checkpoint_loads_from_its_state_dict_with_module_prefixes(tmp_path):
    source = random_state(medicalnet_shapes(10), seed=2)
    path = tmp_path / "resnet_10_23dataset.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}}, path)
    features = BackboneFeatures("resnet10", spatial_dims=3, in_channels=1, **STEM)
    features.load_weights(path)
    check_loaded(features, source, "conv_seg.")


def save(tmp_path, shapes: dict, name: str = "weights.pth", seed: int = 0):
    path = tmp_path / name
    torch.save(random_state(shapes, seed), path)
    return path


def meta_backbone(name: str, **options) -> BackboneFeatures:
    """A backbone with shapes but no memory: for checks that refuse before anything is copied."""
    with torch.device("meta"):
        return BackboneFeatures(name, **options)


def test_a_backbone_that_does_not_fit_is_refused_naming_the_file_and_both_sides(tmp_path):
    path = save(tmp_path, torchvision_shapes(18), "resnet18-f37072fd.pth")
    with pytest.raises(ValueError, match=r"resnet18-f37072fd.pth: torchvision resnet18 weights were trained with a "
                                         r"7x7 stride-2 first convolution with max pooling; this backbone has a 7x7 "
                                         r"stride-1 first convolution with max pooling: build it with .*conv1_t_stride"):
        BackboneFeatures("resnet18", in_channels=3).load_weights(path)  # MONAI's default stem
    with pytest.raises(ValueError, match="stride-2 first convolution without max pooling"):
        BackboneFeatures("resnet18", in_channels=3, conv1_t_stride=2, no_max_pool=True).load_weights(path)
    with pytest.raises(ValueError, match="holds torchvision resnet18 weights; the backbone is resnet34"):
        BackboneFeatures("resnet34", in_channels=3, **STEM).load_weights(path)
    with pytest.raises(ValueError, match="torchvision weights are 2D, the resnet18 backbone is 3D"):
        meta_backbone("resnet18", spatial_dims=3, **STEM).load_weights(path)
    with pytest.raises(ValueError, match="take 3 input channels, the backbone 2"):
        BackboneFeatures("resnet18", in_channels=2, **STEM).load_weights(path)
    with pytest.raises(ValueError, match=r"resnet18-f37072fd.pth .* does not hold resnet18 \(2D\).*wrong shape "
                                         r"\[\('conv1.weight', \(64, 1, 7, 7\), \(32, 1, 7, 7\)\)"):
        BackboneFeatures("resnet18", widen_factor=0.5, **STEM).load_weights(path)
    with pytest.raises(ValueError, match="torchvision weights are ResNet weights; the backbone is densenet121"):
        BackboneFeatures("densenet121").load_weights(f"torchvision:{path}")

    broken = random_state(torchvision_shapes(18))
    del broken["layer2.0.bn1.running_var"]
    broken["layer3.1.conv3.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "edited.pth")
    with pytest.raises(ValueError, match=r"edited.pth \(torchvision checkpoint\) .*missing \['layer2.0.bn1.running_var'\], "
                                         r"unexpected \['layer3.1.conv3.weight'\]"):
        BackboneFeatures("resnet18", in_channels=3, **STEM).load_weights(tmp_path / "edited.pth")

    medicalnet = save(tmp_path, medicalnet_shapes(18), "resnet_18.pth")
    with pytest.raises(ValueError, match=r"resnet_18.pth: medicalnet resnet18 weights use shortcut type A; the backbone "
                                         r"was built with type B: build it with .*'shortcut_type': 'A'"):
        meta_backbone("resnet18", spatial_dims=3, **STEM).load_weights(medicalnet)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        BackboneFeatures("resnet18").load_weights(tmp_path / "absent.pth")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth is not a PyTorch checkpoint"):
        BackboneFeatures("resnet18").load_weights(tmp_path / "notes.pth")


def test_a_format_prefix_overrides_detection(tmp_path):
    # a torchvision ResNet someone already cut to one input channel: the key names no longer say torchvision
    path = save(tmp_path, torchvision_shapes(18) | {"conv1.weight": (64, 1, 7, 7)}, "grey.pth")
    with pytest.raises(ValueError, match=r"grey.pth \(monai checkpoint\).*missing \['layer2.0.downsample.0.bias'"):
        BackboneFeatures("resnet18", **STEM).load_weights(path)
    features = BackboneFeatures("resnet18", **STEM)
    features.load_weights(f"torchvision:{path}")
    check_loaded(features, torch.load(path), "fc.")


def test_monai_checkpoints_are_not_taken_for_torchvision_ones():
    # MONAI's default ResNet has biased projection shortcuts; shortcut type A has none at all
    for options in ({}, {"shortcut_type": "A"}):
        with torch.device("meta"):
            state = BackboneFeatures("resnet18", in_channels=3, **options).net.state_dict()
        assert detect_format(state | {"fc.weight": torch.empty(2, 512, device="meta")}) == "monai"
    assert detect_format({k: torch.empty(s, device="meta") for k, s in torchvision_shapes(34).items()}) == "torchvision"
