"""Known answers for the faithfulness metrics, the sanity check, sign consistency and the ceilings
(``bundle.explain.faithfulness``, ``metrics``, ``localisation``)."""

import math

import pytest
import torch

from bundle.explain.faithfulness import (
    confidence_change,
    count_patches,
    deletion_curve,
    insertion_curve,
    layers_from_output,
    parameter_randomisation_correlation,
    random_patch_maps,
    randomise_modules,
)
from bundle.explain.localisation import (
    activation_precision,
    ideal_maps,
    pointing_game,
    random_maps,
)
from bundle.explain.metrics import (
    disease_classes,
    evidence_sign_consistency,
    spearman_correlation,
)
from bundle.networks.classifier import classifier
from bundle.networks.sigmoid_branch import SigmoidBranchClassifier
from bundle.visualize import upsample
from tests.test_metrics import SHAPES, box_mask

def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logits_from_probability(q: torch.Tensor) -> torch.Tensor:
    """Two-class logits (B, 2) whose softmax is exactly (1 - q, q)."""
    return torch.stack([torch.log1p(-q), torch.log(q)], dim=1)


# --- faithfulness to the model -------------------------------------------------------------------


def summed_logit_model(images: torch.Tensor) -> torch.Tensor:
    """Logits (0, sum(x) - 2): p_1 = sigmoid(sum(x) - 2)."""
    total = images.flatten(1).sum(1)
    return torch.stack([torch.zeros_like(total), total - 2], dim=1)


@pytest.mark.parametrize("dims", [2, 3])
def test_average_drop_and_increase_in_confidence_by_hand(dims):
    spatial = (2, 2, 1)[:dims]
    images = torch.ones(2, 1, *spatial)
    # ReLU then min-max: (0, 1/3, 1/3, 1), sum 5/3 (min-max of the signed map would give (0, 1/2, 1/2, 1))
    maps = torch.tensor([-3.0, 1.0, 1.0, 3.0]).view(1, *spatial).repeat(2, *[1] * dims)
    targets = torch.tensor([1, 0])
    result = confidence_change(summed_logit_model, images, maps, targets)
    y1, o1 = sigmoid(2), sigmoid(5 / 3 - 2)  # class 1 loses confidence
    y0, o0 = 1 - sigmoid(2), 1 - sigmoid(5 / 3 - 2)  # class 0 gains it
    assert o0 > y0
    assert result.drop.tolist() == pytest.approx([100 * (y1 - o1) / y1, 0.0])
    assert result.increase.tolist() == [False, True]
    assert result.average_drop.item() == pytest.approx(50 * (y1 - o1) / y1)
    assert result.increase_in_confidence.item() == pytest.approx(50)


def corner_patch_model(images: torch.Tensor) -> torch.Tensor:
    """Only the top-left 4x4 patch matters: p_1 = sigmoid(4 * mean(patch) - 2)."""
    score = 4 * images[:, 0, :4, :4].mean((1, 2)) - 2
    return torch.stack([torch.zeros_like(score), score], dim=1)


def test_deleting_the_informative_patch_first_gives_the_lower_audc():
    images, targets = torch.ones(2, 1, 8, 8), torch.tensor([1, 1])
    first = torch.zeros(8, 8)
    first[:4, :4] = 1  # ranks the informative patch first
    last = 1 - first  # ranks it last (the three others tie and keep raster order)
    curve = deletion_curve(corner_patch_model, images, torch.stack([first, last]), targets, patch_size=4, chunk_size=3)
    ratio = sigmoid(-2) / sigmoid(2)
    assert curve.counts.tolist() == [0, 1, 2, 3, 4] and curve.fractions.tolist() == [0, 0.25, 0.5, 0.75, 1]
    assert curve.scores[0].tolist() == pytest.approx([1, ratio, ratio, ratio, ratio])
    assert curve.scores[1].tolist() == pytest.approx([1, 1, 1, 1, ratio])
    assert curve.area.tolist() == pytest.approx([0.25 * (0.5 + 3.5 * ratio), 0.25 * (3.5 + 0.5 * ratio)])
    assert curve.area[0] < curve.area[1]


def test_deletion_removes_the_first_patches_one_at_a_time_over_a_unit_axis():
    # 16 patches of 2 x 2; only the first num_patches = 3 are deleted, one per step; x is step / 3
    images, targets = torch.ones(1, 1, 8, 8), torch.tensor([1])
    maps = torch.arange(64.0).view(1, 8, 8).flip(1)  # rows from the bottom: the bottom-right patch first
    curve = deletion_curve(area_model, images, maps, targets, patch_size=2, num_patches=3)
    assert curve.counts.tolist() == [0, 1, 2, 3] and curve.fractions.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    # p' = 0.9 * (1 - n / 16) + 0.05 after n patches of 16
    expected = [(0.95 - 0.9 * n / 16) / 0.95 for n in range(4)]
    assert curve.scores[0].tolist() == pytest.approx(expected)
    assert curve.area.item() == pytest.approx((expected[0] + 2 * expected[1] + 2 * expected[2] + expected[3]) / 6)
    assert count_patches((8, 8), 2) == 16 and count_patches((9, 8, 8), 4) == 3 * 2 * 2
    with pytest.raises(ValueError, match="at least 1"):
        deletion_curve(area_model, images, maps, targets, patch_size=2, num_patches=0)


def test_random_patch_maps_give_a_seeded_random_order_constant_on_each_patch():
    maps = random_patch_maps((2, 9, 8), patch_size=4, seed=3)  # 3 x 2 patches, the last row of patches 1 pixel high
    assert maps.shape == (2, 9, 8)
    assert torch.equal(maps, random_patch_maps((2, 9, 8), patch_size=4, seed=3))
    assert not torch.equal(maps, random_patch_maps((2, 9, 8), patch_size=4, seed=4))
    assert not torch.equal(maps[0], maps[1])  # each image its own order
    for patch in (maps[:, :4, :4], maps[:, 4:8, 4:], maps[:, 8:, :4]):
        assert (patch == patch.flatten(1)[:, :1, None]).all()  # one value per patch
    assert len(maps[0].unique()) == 6
    volume = random_patch_maps((1, 4, 4, 4), patch_size=2, seed=0)
    assert len(volume.unique()) == 8 and (volume[0, :2, :2, :2] == volume[0, 0, 0, 0]).all()


def area_model(images: torch.Tensor) -> torch.Tensor:
    """p_1 = 0.9 * mean(x) + 0.05: on an image of ones, linear in the area left."""
    return logits_from_probability(0.9 * images.flatten(1).mean(1) + 0.05)


@pytest.mark.parametrize("dims", [2, 3])
def test_deletion_and_insertion_areas_of_a_linear_curve(dims):
    images = torch.ones(2, 1, *[4] * dims)
    maps, targets = torch.randn(2, *[4] * dims), torch.tensor([1, 1])
    # every patch deleted: p'/p = (0.95 - 0.9 f) / 0.95, area (0.95 - 0.45) / 0.95;
    # insertion: p'/p = (0.05 + 0.9 f) / 0.95, area (0.05 + 0.45) / 0.95
    deletion = deletion_curve(area_model, images, maps, targets, patch_size=2)
    insertion = insertion_curve(area_model, images, maps, targets, patch_size=2)
    assert deletion.area.tolist() == pytest.approx([0.5 / 0.95] * 2)
    assert insertion.area.tolist() == pytest.approx([0.5 / 0.95] * 2)
    assert insertion.scores[:, 0].tolist() == pytest.approx([0.05 / 0.95] * 2)
    assert len(deletion.fractions) == 2**dims + 1


# --- sanity check and sign consistency -----------------------------------------------------------


def test_spearman_correlation_with_and_without_ties():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 3.0]])
    b = torch.tensor([[1.0, 3.0, 2.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    # no ties: 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 12 / 60; ties: ranks (1.5, 1.5, 3, 4) vs (1, 2, 3, 4)
    assert spearman_correlation(a, b).tolist() == pytest.approx([0.8, math.sqrt(0.9)])


def input_gradient(model, images, targets):
    """|d logit_target / d x| summed over channels: a map that depends on every layer."""
    images = images.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(model(images).gather(1, targets[:, None]).sum(), images)
    return gradient.abs().sum(1)


def test_parameter_randomisation_decorrelates_gradients_but_not_model_free_maps():
    torch.manual_seed(0)
    model = classifier("resnet10", spatial_dims=2, num_classes=2, backbone_kwargs={"widen_factor": 0.25}).eval()
    images, targets = torch.randn(3, 1, 32, 32), torch.tensor([0, 1, 1])
    before = {name: value.clone() for name, value in model.state_dict().items()}
    everything = layers_from_output(model, model.features, model.head, num_layers=24)  # every conv and BatchNorm of ResNet-10
    correlation = parameter_randomisation_correlation(model, input_gradient, images, targets, everything, seed=1)
    assert (correlation < 0.5).all()
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in before.items())  # original untouched
    unchanged = parameter_randomisation_correlation(model, lambda m, x, t: x[:, 0] ** 2, images, targets, everything)
    assert unchanged.tolist() == pytest.approx([1.0] * 3)


TINY = {"backbone": "resnet10", "num_classes": 2, "backbone_kwargs": {"widen_factor": 0.125}}


def test_every_classifier_randomises_the_same_backbone_layers_and_its_explaining_head():
    black_box, softcam = classifier(head="linear", **TINY), classifier(head="softcam", **TINY)
    models = {"black box": (black_box, "head"), "SoftCAM": (softcam, "head"),
              "black box + dual branch": (SigmoidBranchClassifier.from_classifier(black_box), "branch"),
              "SoftCAM + sigmoid branch": (SigmoidBranchClassifier.from_classifier(softcam), "branch")}
    chosen = {name: layers_from_output(model, model.features, getattr(model, head), 3) for name, (model, head) in models.items()}
    expected_backbone = ["features.net.layer4.0.bn2", "features.net.layer4.0.downsample.0", "features.net.layer4.0.downsample.1"]
    for name, (model, head) in models.items():
        assert chosen[name] == expected_backbone + [head], name  # the same backbone layers, whatever the head
    dual = models["black box + dual branch"][0]
    with torch.no_grad():  # trained-looking values everywhere, so that a re-initialised module shows
        for value in dual.state_dict().values():
            if value.is_floating_point():
                value.uniform_(0.5, 1.5)
    randomised = randomise_modules(dual, chosen["black box + dual branch"], seed=0)
    changed = {key for key, value in dual.state_dict().items() if not torch.equal(value, randomised.state_dict()[key])}
    # the three backbone modules (their weights, biases, BatchNorm statistics) and the branch; not the softmax head
    assert {key.rsplit(".", 1)[0] for key in changed} == {*expected_backbone, "branch.fc"}
    again = randomise_modules(dual, chosen["black box + dual branch"], seed=0)  # seeded: reproducible
    assert torch.equal(again.branch.fc.weight, randomised.branch.fc.weight)
    with pytest.raises(ValueError, match="num_layers"):
        layers_from_output(softcam, softcam.features, softcam.head, 10_000)
    with pytest.raises(ValueError, match="no modules named"):
        randomise_modules(softcam, ["features.net.layer9"])


@pytest.mark.parametrize("dims", [2, 3])
def test_evidence_sign_consistency_on_signed_maps(dims):
    diseased_map = torch.tensor([1.0, 2.0, -1.0, 0.0]).view(1, *[2, 2, 1][:dims]).expand(1, *[2] * dims)
    healthy_map = torch.tensor([-1.0, -3.0, 1.0, 0.0]).view(1, *[2, 2, 1][:dims]).expand(1, *[2] * dims)
    maps, diseased = torch.cat([diseased_map, healthy_map]), torch.tensor([True, False])
    # area: 2 of 4 locations agree in both; mass: 3 of 4 (diseased), 4 of 5 (healthy)
    assert evidence_sign_consistency(maps, diseased).tolist() == pytest.approx([0.5, 0.5])
    assert evidence_sign_consistency(maps, diseased, by="mass").tolist() == pytest.approx([3 / 4, 4 / 5])


def test_disease_classes_are_the_label_or_the_highest_scoring_disease_class():
    labels = torch.tensor([0, 1, 2, 0])
    logits = torch.tensor([[5.0, 1.0, 2.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [9.0, 3.0, 1.0]])
    assert disease_classes(labels, logits).tolist() == [2, 1, 2, 1]  # healthy images: the disease the model favours
    assert disease_classes(torch.tensor([0, 1]), torch.tensor([[3.0, -1.0], [0.0, 1.0]])).tolist() == [1, 1]


@pytest.mark.parametrize("dims", [2, 3])
def test_ideal_and_random_maps_at_an_evidence_grid(dims):
    spatial = SHAPES[dims]
    mask = box_mask(dims, (0,) * dims, (3,) * dims)  # exactly the first cell of a grid of 4-voxel cells
    grid = tuple(s // 4 for s in spatial)
    cell = torch.zeros(1, 1, *grid)
    cell[(0, 0, *[0] * dims)] = 1.0
    ideal = ideal_maps(mask, grid)
    assert torch.allclose(ideal, upsample(cell, spatial)[:, 0])  # pooled to the grid, upsampled like the explainers
    assert pointing_game(ideal, mask).item() == 1 and activation_precision(ideal, mask).item() < 1
    assert torch.equal(ideal_maps(mask, spatial), mask.float())  # at input resolution the ideal map is the mask
    noise = random_maps((2, *spatial), grid, seed=0)
    assert noise.shape == (2, *spatial) and 0 <= noise.min() and noise.max() < 1
    assert torch.equal(noise, random_maps((2, *spatial), grid, seed=0))
    assert not torch.equal(noise, random_maps((2, *spatial), grid, seed=1))

