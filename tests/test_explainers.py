import pytest
import torch
from monai.data import MetaTensor
from torch import nn
from torch.nn import functional as F

from bundle.explain.methods import EXPLAINERS, Explanation, make_explainer
from bundle.explain.targets import TARGETS, BranchLogit, ContrastLogit, HeadLogit
from bundle.networks import classifier
from bundle.networks.classifier import class_evidence
from bundle.networks.sigmoid_branch import SigmoidBranchClassifier
from bundle.visualize import upsample

# feature maps 4 x 4 for 32 x 32 inputs and 2 x 2 x 2 for 16^3 (stride 8)
TINY = {
    "backbone": "resnet10",
    "num_classes": 3,
    "backbone_kwargs": {"widen_factor": 0.125, "no_max_pool": True, "conv1_t_stride": 1},
}
SIZE = {2: 32, 3: 16}
GRADIENT_METHODS = ["gradcam", "gradcampp", "xgradcam", "layercam", "integrated_gradients", "guided_backprop"]
FAST = {"integrated_gradients": {"n_steps": 8}}  # options that keep the structural tests quick


def tiny(head: str, spatial_dims: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return classifier(spatial_dims=spatial_dims, head=head, **TINY).eval()


def images(spatial_dims: int = 2, n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, *([SIZE[spatial_dims]] * spatial_dims), generator=torch.Generator().manual_seed(seed))


def features_of(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model.features(x)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", sorted(EXPLAINERS))
def test_every_method_maps_each_image_for_its_own_class(name, spatial_dims):
    model = tiny("softcam" if name == "softcam" else "linear", spatial_dims)
    explainer = make_explainer(name, model, **FAST.get(name, {}))
    x = images(spatial_dims, n=2)
    targets = torch.tensor([0, 2])
    explanation = explainer(x, targets)
    assert isinstance(explanation, Explanation)
    input_level = name in ("integrated_gradients", "guided_backprop")
    raw_size = x.shape[2:] if input_level else features_of(model, x).shape[2:]
    assert explanation.raw.shape == (2, 1, *raw_size)
    assert explanation.upsampled.shape == (2, 1, *x.shape[2:])
    for maps in (explanation.raw, explanation.upsampled):
        assert maps.dtype == torch.float32 and maps.device == next(model.parameters()).device and not maps.requires_grad
    assert torch.allclose(explanation.upsampled, upsample(explanation.raw, tuple(x.shape[2:])), atol=1e-6)
    assert torch.equal(explanation.targets, targets)
    # a batch gives each image the map a single-image call gives for that image's class, not another class's
    for i, target in enumerate(targets.tolist()):
        assert torch.allclose(explanation.raw[i], explainer(x[i : i + 1], [target]).raw[0], rtol=1e-4, atol=1e-6)
    others = explainer(x, [1, 0]).raw
    assert any(not torch.allclose(explanation.raw[i], others[i], rtol=1e-4, atol=1e-6) for i in range(2))


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("head", ["linear", "softcam"])
def test_cam_is_the_heads_class_map_without_its_bias(head, spatial_dims):
    # torchcam's CAM is sum_d w_kd F_d: signed, no ReLU, no bias
    model = tiny(head, spatial_dims)
    x = images(spatial_dims)
    targets = torch.tensor([2, 0, 1])
    raw = make_explainer("cam", model)(x, targets).raw
    class_maps = model.head.class_maps(features_of(model, x)).detach()
    bias = (model.head.fc if head == "linear" else model.head.class_evidence_layer).bias.detach()
    expected = torch.stack([class_maps[i, k] - bias[k] for i, k in enumerate(targets.tolist())]).unsqueeze(1)
    assert torch.allclose(raw, expected, atol=1e-5)
    assert (raw < 0).any() and (raw > 0).any()  # signed


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("head", ["linear", "softcam"])
def test_gradient_cams_of_a_mean_pooled_linear_head_have_closed_forms(head, spatial_dims):
    # logit_k = mean_ij(sum_d w_kd F_d(ij)) + b_k for both heads, so dlogit_k/dF_d(ij) = w_kd / n everywhere
    model = tiny(head, spatial_dims)
    x = images(spatial_dims)
    targets = torch.tensor([1, 0, 2])
    features = features_of(model, x)
    n = features[0, 0].numel()
    weight = (model.head.fc if head == "linear" else model.head.class_evidence_layer).weight.detach().reshape(3, -1)
    cam = make_explainer("cam", model)(x, targets).raw
    gradcam = make_explainer("gradcam", model)(x, targets).raw
    assert torch.allclose(gradcam * n, torch.relu(cam), atol=1e-5)  # Grad-CAM is CAM without bias, ReLU'd, over n
    assert (gradcam > 0).any()
    assert torch.allclose(make_explainer("xgradcam", model)(x, targets).raw, gradcam, atol=1e-6)  # XGrad-CAM = Grad-CAM
    g = weight[targets] / n  # (B, D) gradients
    spatial = (...,) + (None,) * spatial_dims
    layercam = torch.relu((torch.relu(g)[spatial] * features).sum(1, keepdim=True))
    assert torch.allclose(make_explainer("layercam", model)(x, targets).raw, layercam, atol=1e-6)
    # Grad-CAM++ (paper eq. 19): alpha = g^2 / (2 g^2 + g^3 sum F) -> w_d = n relu(g_d) / (2 + g_d sum F_d)
    summed = features.flatten(2).sum(-1)
    w = torch.where(g != 0, n * torch.relu(g) / (2 + g * summed), torch.zeros_like(g))
    gradcampp = torch.relu((w[spatial] * features).sum(1, keepdim=True))
    assert torch.allclose(make_explainer("gradcampp", model)(x, targets).raw, gradcampp, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_softcam_explainer_returns_the_evidence_maps_whose_mean_is_the_logit(spatial_dims):
    model = tiny("softcam", spatial_dims)
    x = images(spatial_dims)
    explanation = make_explainer("softcam", model)(x)
    with torch.no_grad():
        logits, maps = model.forward_with_maps(x)
    predicted = logits.argmax(1)
    assert torch.equal(explanation.targets, predicted)
    assert torch.equal(explanation.raw[:, 0], maps[torch.arange(3), predicted])
    assert torch.allclose(explanation.raw.flatten(1).mean(1), logits[torch.arange(3), predicted], atol=1e-6)
    with pytest.raises(TypeError, match="LinearHead"):
        make_explainer("softcam", tiny("linear"))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_integrated_gradients_are_complete(spatial_dims):
    model = tiny("linear", spatial_dims)
    x = images(spatial_dims)
    targets = torch.tensor([0, 1, 2])
    raw = make_explainer("integrated_gradients", model, n_steps=64)(x, targets).raw
    with torch.no_grad():
        gain = (model(x) - model(torch.zeros_like(x)))[torch.arange(3), targets]
    # Gauss-Legendre quadrature of a piecewise-linear (ReLU) path: exact only in the limit
    assert torch.allclose(raw.flatten(1).sum(1), gain, rtol=0.02, atol=5e-4)
    assert gain.abs().max() > 0.02  # well above the tolerance


def no_hooks(model: nn.Module) -> bool:
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return not any(getattr(m, h) for m in model.modules() for h in hooks)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gradient_methods_run_under_no_grad_and_inference_mode_and_leave_the_model_as_it_was(name):
    model = tiny("softcam")
    explainer = make_explainer(name, model, **FAST.get(name, {}))
    x = images()
    # the caller's state: training mode, a frozen first layer, the evidence maps of its own last forward pass
    model.train()
    first = next(model.parameters())
    first.requires_grad_(False)
    with torch.no_grad():
        model(images(n=2, seed=7))
    kept_maps = model.evidence_maps
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    expected = explainer(x, [0, 1, 2]).raw
    with torch.no_grad():  # as in a MONAI evaluator, whose batches may be MetaTensors
        under_no_grad = explainer(MetaTensor(x), [0, 1, 2]).raw
    with torch.inference_mode():
        under_inference = explainer(x.clone(), [0, 1, 2]).raw
    assert torch.allclose(under_no_grad, expected, atol=1e-6) and torch.allclose(under_inference, expected, atol=1e-6)
    assert type(under_no_grad) is torch.Tensor and not under_inference.is_inference()
    assert all(m.training for m in model.modules())
    assert not first.requires_grad and all(p.requires_grad for p in list(model.parameters())[1:])
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())  # BatchNorm ran in eval mode
    assert model.evidence_maps is kept_maps
    assert no_hooks(model)


def dual(head: str = "linear", spatial_dims: int = 2) -> SigmoidBranchClassifier:
    model = SigmoidBranchClassifier.from_classifier(tiny(head, spatial_dims)).eval()
    with torch.no_grad():  # a branch that favours some channels, as training would make it
        for p in model.branch.parameters():
            p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_branch_cams_weight_the_features_by_the_branchs_clamped_weights(spatial_dims):
    model = dual("linear", spatial_dims)
    x = images(spatial_dims)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    features = features_of(model, x)
    n = features[0, 0].numel()
    w = model.branch.fc.weight.detach()[predicted]
    assert (w < 0).any() and (w > 0).any()
    spatial = (...,) + (None,) * spatial_dims
    expected = torch.relu((w.clamp_min(0)[spatial] * features).sum(1, keepdim=True))  # M = ReLU(sum_d max(w_d, 0) F_d)
    cam = make_explainer("cam", model, target="branch")(x)
    assert torch.equal(cam.targets, predicted)  # k* is the frozen softmax head's arg-max
    assert torch.allclose(cam.raw, expected, atol=1e-5)
    # gradients of the branch logit z_k* are w / n everywhere: Grad-CAM, XGrad-CAM and LayerCAM are CAM / n
    for name in ("gradcam", "xgradcam", "layercam"):
        assert torch.allclose(make_explainer(name, model, target="branch")(x).raw * n, expected, atol=1e-5), name
    softmax_head_cam = make_explainer("cam", model)(x).raw
    assert not torch.allclose(softmax_head_cam, cam.raw, atol=1e-3)


@pytest.mark.parametrize("name", ["cam", "gradcam", "gradcampp", "xgradcam", "layercam"])
def test_only_the_branchs_positive_weights_count(name):
    model = dual("linear")
    x = images()
    targets = torch.tensor([1, 1, 1])
    features = features_of(model, x)
    d0 = int(features.flatten(2).amin(2).sum(0).argmax())  # a channel active everywhere
    with torch.no_grad():
        model.branch.fc.weight[1] = -1.0  # every weight of the class negative: nothing is left after the clamp
    assert make_explainer(name, model, target="branch")(x, targets).raw.abs().max() == 0
    assert make_explainer("cam", model)(x, targets).raw.abs().max() > 0  # the softmax head's CAM is not empty
    with torch.no_grad():
        model.branch.fc.weight[1, d0] = 0.5  # one positive weight among large negative ones
    raw = make_explainer(name, model, target="branch")(x, targets).raw
    # M = ReLU(sum_d max(w_d, 0) F_d) is that channel's map (a ReLU of the unclamped sum would be all zero)
    assert (raw > 0).all()
    scale = raw.flatten(1).sum(1) / features[:, d0].flatten(1).sum(1)
    assert torch.allclose(raw[:, 0], scale.view(-1, 1, 1) * features[:, d0], rtol=1e-4, atol=1e-7)
    if name == "cam":
        assert torch.allclose(scale, torch.full_like(scale, 0.5))


def test_branch_score_cam_scores_masked_inputs_by_the_branch_logit():
    # a branch row of zeros makes z_k blind to the input: every mask gains 0, the softmax weights are all 1/D
    # and the map is the channel mean of the features; the softmax head's Score-CAM is not
    model = dual("linear")
    x = images()
    targets = torch.tensor([2, 2, 2])
    with torch.no_grad():
        model.branch.fc.weight[2] = 0.0
    features = features_of(model, x)
    branch = make_explainer("scorecam", model, target="branch", batch_size=16)(x, targets).raw
    assert torch.allclose(branch, features.mean(1, keepdim=True), atol=1e-6)
    assert not torch.allclose(make_explainer("scorecam", model)(x, targets).raw, branch, atol=1e-4)


def test_branch_score_cam_follows_the_dual_branch_reference():
    # Oh & Noh's score_cam.py: w = softmax_d(max(z_k(x * A_d), 0)), no baseline subtracted; worked out here by hand
    model = dual("linear")
    x = images(n=2)
    targets = torch.tensor([1, 0])
    features = features_of(model, x)
    low, high = features.flatten(2).amin(2)[..., None, None], features.flatten(2).amax(2)[..., None, None]
    masks = F.interpolate((features - low) / (high - low + 1e-8), size=x.shape[2:], mode="bilinear", align_corners=False)

    def masked_scores():  # (B, D): branch logit of the explained class on the input masked by each channel
        with torch.no_grad():
            return torch.stack([model(x[i] * masks[i, :, None], branch=True)[:, k] for i, k in enumerate(targets.tolist())])

    with torch.no_grad():  # shift the branch biases so that about half of the masked scores are negative
        model.branch.fc.bias[targets] -= masked_scores().median(1).values
    scores = masked_scores()
    assert (scores < 0).any() and (scores > 0).any()
    weights = torch.softmax(scores.clamp(min=0), dim=1)
    expected = torch.relu((weights[..., None, None] * features).sum(1, keepdim=True))
    raw = make_explainer("scorecam", model, target="branch", batch_size=16)(x, targets).raw
    assert torch.allclose(raw, expected, rtol=1e-4, atol=1e-6)
    # torchcam's own rule, softmax_d(z_k(x * A_d) - z_k(x)), gives another map on the same model
    with torch.no_grad():
        baseline = model(x, branch=True)[torch.arange(2), targets]
    torchcam_rule = torch.relu((torch.softmax(scores - baseline[:, None], 1)[..., None, None] * features).sum(1, keepdim=True))
    assert not torch.allclose(torchcam_rule, expected, rtol=1e-3, atol=1e-5)


def test_class_evidence_gives_raw_maps_or_the_contrast_of_each_class_with_the_others():
    maps = torch.tensor([1.0, 4.0, -2.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    assert class_evidence(maps, "raw") is maps
    contrast = class_evidence(maps, "contrast")
    # E_k - mean of the other two: 1 - (4 - 2)/2, 4 - (1 - 2)/2, -2 - (1 + 4)/2
    assert contrast[0, :, 0, 0].tolist() == pytest.approx([0.0, 4.5, -4.5])
    two = torch.randn(3, 2, 4, 4, 4)  # 3D, two classes: E_1 - E_0 and its negative
    assert torch.allclose(class_evidence(two, "contrast")[:, 1], two[:, 1] - two[:, 0], atol=1e-6)
    assert torch.allclose(class_evidence(two, "contrast")[:, 0], two[:, 0] - two[:, 1], atol=1e-6)
    logits = torch.tensor([[0.5, 2.0]])
    assert class_evidence(logits, "contrast")[0].tolist() == pytest.approx([-1.5, 1.5])  # works on logits (B, C) too
    # adding one map to every class's evidence changes no logit difference, and no contrast map
    shifted = maps + torch.randn(2, 1, 2, 2)
    assert torch.allclose(class_evidence(shifted, "contrast"), contrast, atol=1e-6)
    with pytest.raises(ValueError, match="raw"):
        class_evidence(maps, "difference")
    with pytest.raises(ValueError, match="two classes"):
        class_evidence(maps[:, :1], "contrast")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_softcam_contrast_target_explains_the_contrast_map_whose_mean_is_the_contrast_logit(spatial_dims):
    model = tiny("softcam", spatial_dims)
    x = images(spatial_dims)
    targets = torch.tensor([0, 1, 2])
    explanation = make_explainer("softcam", model, target="contrast")(x, targets)
    with torch.no_grad():
        logits, maps = model.forward_with_maps(x)
    others = (maps.sum(1) - maps[torch.arange(3), targets]) / 2
    assert torch.allclose(explanation.raw[:, 0], maps[torch.arange(3), targets] - others, atol=1e-5)
    contrast_logits = logits[torch.arange(3), targets] - (logits.sum(1) - logits[torch.arange(3), targets]) / 2
    assert torch.allclose(explanation.raw.flatten(1).mean(1), contrast_logits, atol=1e-5)
    raw = make_explainer("softcam", model)(x, targets).raw
    assert not torch.allclose(raw, explanation.raw, atol=1e-3)


@pytest.mark.parametrize("head", ["linear", "softcam"])
def test_gradcam_of_the_contrast_target_weights_channels_by_the_contrasted_class_weights(head):
    # d(z_k - mean_{j != k} z_j)/dF_d = (w_kd - mean_{j != k} w_jd) / n at every location
    model = tiny(head)
    x = images()
    targets = torch.tensor([2, 0, 1])
    features = features_of(model, x)
    n = features[0, 0].numel()
    weight = (model.head.fc if head == "linear" else model.head.class_evidence_layer).weight.detach().reshape(3, -1)
    contrasted = class_evidence(weight.T, "contrast").T[targets] / n  # contrast over the class axis of (D, C)
    expected = torch.relu((contrasted[..., None, None] * features).sum(1, keepdim=True))
    assert torch.allclose(make_explainer("gradcam", model, target="contrast")(x, targets).raw, expected, atol=1e-6)
    with pytest.raises(ValueError, match="contrast"):
        make_explainer("cam", model, target="contrast")


def test_explainers_and_targets_say_who_they_are():
    assert {name: (cls.title, cls.family) for name, cls in EXPLAINERS.items()} == {
        "softcam": ("SoftCAM", "self-explaining"), "cam": ("CAM", "cam"), "gradcam": ("Grad-CAM", "cam"),
        "gradcampp": ("Grad-CAM++", "cam"), "xgradcam": ("XGrad-CAM", "cam"), "layercam": ("LayerCAM", "cam"),
        "scorecam": ("Score-CAM", "cam"), "integrated_gradients": ("Integrated Gradients", "gradient"),
        "guided_backprop": ("Guided Backprop", "gradient")}
    assert TARGETS == {"logit": HeadLogit(), "branch": BranchLogit(), "contrast": ContrastLogit()}
    model = dual("softcam")
    assert make_explainer("softcam", model, target="branch").target == BranchLogit()
    assert BranchLogit().explaining_head(model) is model.branch and ContrastLogit().explaining_head(model) is model.head


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_softcam_branch_gives_the_sigmoid_evidence_maps(spatial_dims):
    model = dual("softcam", spatial_dims)
    x = images(spatial_dims)
    explanation = make_explainer("softcam", model, target="branch")(x)
    with torch.no_grad():
        logits, branch_logits = model.forward_with_branch(x)
        branch_maps = model.branch.class_maps(model.features(x))
    k = logits.argmax(1)
    assert torch.equal(explanation.targets, k)
    assert torch.allclose(explanation.raw[:, 0], branch_maps[torch.arange(3), k], atol=1e-6)
    assert torch.allclose(explanation.raw.flatten(1).mean(1), branch_logits[torch.arange(3), k], atol=1e-5)


def test_unknown_methods_and_misused_options_are_clear_errors():
    with pytest.raises(ValueError, match="unknown explanation method"):
        make_explainer("occlusion", tiny("linear"))
    with pytest.raises(ValueError, match="unknown explanation target"):
        make_explainer("gradcam", tiny("linear"), target="sigmoid")
    with pytest.raises(TypeError, match="SigmoidBranchClassifier"):
        make_explainer("gradcam", tiny("linear"), target="branch")
    with pytest.raises(ValueError, match="no sigmoid-branch variant"):
        make_explainer("integrated_gradients", dual(), target="branch")
    with pytest.raises(ValueError, match="one class per image"):
        make_explainer("cam", tiny("linear"))(images(), [0, 1])
    with pytest.raises(ValueError, match=">= 0"):
        make_explainer("softcam", tiny("softcam"))(images(), [0, -1, 1])
