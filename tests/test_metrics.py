"""Classification and explanation metrics on hand-made inputs whose answers are worked out by hand."""

import math

import pytest
import torch

from bundle.explain.localisation import (
    activation_precision,
    activation_sensitivity,
    component_boxes,
    gt_localisation,
    label_components,
    mask_boxes,
    max_box_accuracy,
    pointing_game,
    pxap,
    pxap_dataset,
    top1_localisation,
    top_k_localisation_precision,
)
from bundle.explain.metrics import (
    accuracy,
    balanced_accuracy,
    cohen_kappa,
    confidence_change,
    deletion_curve,
    evidence_sign_consistency,
    insertion_curve,
    minmax_scale,
    parameter_randomisation_correlation,
    parameterised_modules,
    randomise_top_layers,
    roc_auc,
    spearman_correlation,
)
from bundle.networks.classifier import classifier

SHAPES = {2: (16, 16), 3: (8, 8, 8)}


def box_mask(dims: int, low: tuple, high: tuple) -> torch.Tensor:
    """A (1, *spatial) bool mask, true on the inclusive box low..high."""
    mask = torch.zeros(1, *SHAPES[dims], dtype=torch.bool)
    mask[(0, *[slice(a, b + 1) for a, b in zip(low, high)])] = True
    return mask


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logits_from_probability(q: torch.Tensor) -> torch.Tensor:
    """Two-class logits (B, 2) whose softmax is exactly (1 - q, q)."""
    return torch.stack([torch.log1p(-q), torch.log(q)], dim=1)


# --- classification ------------------------------------------------------------------------------


def test_accuracy_balanced_accuracy_and_unweighted_kappa():
    labels = torch.tensor([0, 0, 0, 1, 1])
    predictions = torch.tensor([0, 0, 1, 1, 1])  # confusion [[2, 1], [0, 2]]
    assert accuracy(predictions, labels).item() == pytest.approx(4 / 5)
    assert balanced_accuracy(predictions, labels).item() == pytest.approx((2 / 3 + 1) / 2)
    # p_o = 4/5; marginals true (3/5, 2/5), predicted (2/5, 3/5): p_e = 12/25; kappa = (8/25) / (13/25)
    assert cohen_kappa(predictions, labels).item() == pytest.approx(8 / 13)


def test_quadratic_kappa_on_a_three_grade_table():
    labels = torch.tensor([0, 0, 1, 2, 2])
    predictions = torch.tensor([0, 1, 1, 1, 2])
    # True marginals (2, 1, 2)/5, predicted (1, 3, 1)/5. Quadratic costs (i - j)^2 / 4:
    # observed disagreement (1/4 + 1/4) / 5 = 0.1; chance sum_ij w_ij r_i c_j = 7.5 / 25 = 0.3.
    assert cohen_kappa(predictions, labels, weights="quadratic").item() == pytest.approx(1 - 0.1 / 0.3)
    # unweighted: p_o = 3/5, p_e = (2*1 + 1*3 + 2*1) / 25 = 7/25
    assert cohen_kappa(predictions, labels).item() == pytest.approx((3 / 5 - 7 / 25) / (1 - 7 / 25))
    assert math.isnan(cohen_kappa(torch.zeros(4), torch.zeros(4)).item())  # one class only: undefined


def test_roc_auc_binary_uses_the_positive_column_and_counts_ties_half():
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    positive = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.6, 0.6])
    # positives 0.35, 0.8, 0.6 against negatives 0.1, 0.4, 0.6: 1 + 3 + 2.5 pairs won of 9
    expected = 6.5 / 9
    assert roc_auc(torch.stack([1 - positive, positive], 1), labels).item() == pytest.approx(expected)
    assert roc_auc(positive, labels).item() == pytest.approx(expected)


def test_roc_auc_multiclass_is_the_macro_one_vs_rest_mean():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    probabilities = torch.tensor(
        [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.4, 0.3, 0.3], [0.3, 0.3, 0.4], [0.2, 0.1, 0.7]]
    )
    # class 0: 0.7 beats all 4 negatives, 0.2 beats 0.1 and ties 0.2 -> 5.5/8
    # class 1: 0.6 beats all, 0.3 beats 0.2 and 0.1 and ties 0.3 -> 6.5/8; class 2: 8/8
    assert roc_auc(probabilities, labels).item() == pytest.approx((5.5 + 6.5 + 8) / 24)


# --- normalisation and connected components ------------------------------------------------------


def test_minmax_scale_maps_each_map_to_unit_range_and_constant_maps_to_zero():
    maps = torch.stack([torch.tensor([[-2.0, 0.0], [2.0, 6.0]]), torch.full((2, 2), 3.0)])
    scaled = minmax_scale(maps)
    assert torch.equal(scaled[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(scaled[1], torch.zeros(2, 2))


def count_components(labels: torch.Tensor) -> list[int]:
    return [len(image[image > 0].unique()) for image in labels]


def test_label_components_2d_joins_diagonal_neighbours():
    image = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [0, 1, 0, 0, 1, 1],
            [0, 0, 0, 0, 1, 0],
            [0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    labels = label_components(torch.stack([image, torch.zeros_like(image), torch.ones_like(image)]))
    assert count_components(labels) == [4, 0, 1]
    assert labels[0, 0, 0] == labels[0, 1, 1]  # touching only at a corner
    assert labels[0, 1, 4] == labels[0, 1, 5] == labels[0, 2, 4]
    assert labels[0, 0, 0] != labels[0, 4, 0]
    boxes, sizes = component_boxes(labels[:1])
    found = {(tuple(box.tolist()), int(size)) for box, size in zip(boxes[0], sizes[0])}
    assert found == {((0, 0, 1, 1), 2), ((1, 4, 2, 5), 3), ((4, 0, 4, 1), 2), ((4, 5, 4, 5), 1)}


def test_label_components_follows_a_long_winding_path():
    path = torch.zeros(15, 15, dtype=torch.bool)
    path[::2] = True  # rows 0, 2, ..., 14, joined alternately at the right and left ends: one 127-pixel path
    for row in range(1, 15, 2):
        path[row, 14 if row % 4 == 1 else 0] = True
    cut = path.clone()
    cut[7, 0] = False  # break it in the middle: two components
    labels = label_components(torch.stack([path, cut]))
    assert count_components(labels) == [1, 2]
    assert (labels[0][path] == labels[0, 0, 0]).all()


def test_label_components_3d_joins_corner_neighbours_and_boxes_are_cuboids():
    volume = torch.zeros(1, 5, 5, 5, dtype=torch.bool)
    volume[0, 0, 0, 0] = volume[0, 1, 1, 1] = True  # touch at a corner only: one component
    volume[0, 3, 0, 0:2] = True
    volume[0, 4, 4, 4] = True
    labels = label_components(volume)
    assert count_components(labels) == [3]
    assert labels[0, 0, 0, 0] == labels[0, 1, 1, 1]
    boxes, valid = mask_boxes(volume)
    found = {tuple(box.tolist()) for box, ok in zip(boxes[0], valid[0]) if ok}
    assert found == {(0, 0, 0, 1, 1, 1), (3, 0, 0, 3, 0, 1), (4, 4, 4, 4, 4, 4)}


# --- localisation against masks ------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_a_map_equal_to_the_mask_scores_perfectly(dims):
    mask = box_mask(dims, (3,) * dims, (6,) * dims)
    maps = mask.float()
    assert activation_precision(maps, mask).item() == 1
    assert activation_sensitivity(maps, mask).item() == 1
    assert pxap(maps, mask).item() == pytest.approx(1)
    assert pxap_dataset(maps, mask).item() == pytest.approx(1)
    assert pointing_game(maps, mask).item() == 1
    assert top_k_localisation_precision(maps, mask, k=1, patch_size=3).item() == 1
    assert max_box_accuracy(maps, mask).max_box_acc.item() == 1
    assert gt_localisation(maps, mask).item() == 1


@pytest.mark.parametrize("dims", [2, 3])
def test_a_map_outside_the_mask_scores_zero(dims):
    mask = box_mask(dims, (0,) * dims, (1,) * dims)
    maps = box_mask(dims, (5,) * dims, (7,) * dims).float()
    assert activation_precision(maps, mask).item() == 0
    assert activation_sensitivity(maps, mask).item() == 0
    assert pointing_game(maps, mask).item() == 0
    assert max_box_accuracy(maps, mask).max_box_acc.item() == 0
    assert gt_localisation(maps, mask).item() == 0


def test_activation_precision_and_sensitivity_use_minmax_of_the_positive_part():
    maps = torch.tensor([[[-1.0, 0.0], [1.0, 3.0]]])  # ReLU then min-max: [[0, 0], [1/3, 1]]
    mask = torch.tensor([[[False, True], [False, True]]])
    assert activation_precision(maps, mask).item() == pytest.approx(1 / (4 / 3))  # 1 of 4/3 inside
    assert activation_sensitivity(maps, mask).item() == pytest.approx(1 / 2)  # mean of S over the 2 mask pixels
    negative = torch.full((1, 2, 2), -5.0)  # no positive evidence: points nowhere
    assert activation_precision(negative, mask).item() == 0


def test_empty_masks_give_nan_and_drop_out_of_dataset_values():
    mask = torch.cat([box_mask(2, (2, 2), (5, 5)), torch.zeros(1, 16, 16, dtype=torch.bool)])  # lesion, healthy
    maps = torch.cat([box_mask(2, (2, 2), (5, 5)), box_mask(2, (9, 9), (12, 12))]).float()
    for metric in (activation_precision, activation_sensitivity, pointing_game, pxap, gt_localisation):
        values = metric(maps, mask)
        assert values[0].item() == pytest.approx(1) and math.isnan(values[1].item()), metric.__name__
    assert pxap_dataset(maps, mask).item() == pytest.approx(1)
    result = max_box_accuracy(maps, mask)
    assert result.max_box_acc.item() == 1 and torch.isnan(result.best_iou[1]).all()


def test_pxap_of_a_hand_made_ranking():
    maps = torch.tensor([[[1.0, 0.5], [0.25, 0.0]]])
    mask = torch.tensor([[[True, False], [True, False]]])
    # thresholds from high to low: (P, R) = (1, 1/2), (1/2, 1/2), (2/3, 1), (1/2, 1)
    # AP = sum P * dR = 1 * 1/2 + 2/3 * 1/2
    assert pxap(maps, mask).item() == pytest.approx(1 / 2 + 1 / 3)


def test_dataset_pxap_pools_pixels_rather_than_averaging_images():
    masks = torch.cat([box_mask(2, (0, 0), (3, 3)), box_mask(2, (8, 8), (11, 11))])  # 16 of 256 pixels each
    maps = torch.stack([masks[0].float(), torch.ones(16, 16)])  # perfect, then uniform
    assert pxap(maps, masks).tolist() == pytest.approx([1, 16 / 256])
    # pooled: first the 16 lesion pixels of image 1 alone (P 1, R 1/2), then every pixel (P 32/512, R 1)
    assert pxap_dataset(maps, masks).item() == pytest.approx(1 / 2 + 32 / 512 / 2)


@pytest.mark.parametrize("dims", [2, 3])
def test_a_uniform_map_gives_pxap_equal_to_the_mask_fraction(dims):
    mask = box_mask(dims, (0,) * dims, (3,) * dims)
    fraction = mask.float().mean().item()
    assert pxap(torch.ones(1, *SHAPES[dims]), mask).item() == pytest.approx(fraction)


def test_pointing_game_breaks_ties_at_the_first_pixel_and_honours_the_tolerance():
    uniform = torch.ones(1, 16, 16)
    assert pointing_game(uniform, box_mask(2, (0, 0), (2, 2))).item() == 1
    far = box_mask(2, (0, 3), (0, 3))  # 3 pixels from (0, 0)
    assert pointing_game(uniform, far).item() == 0
    assert pointing_game(uniform, far, tolerance=3).item() == 1
    assert pointing_game(uniform, far, tolerance=2.9).item() == 0
    volume = torch.zeros(1, 8, 8, 8)
    volume[0, 1, 2, 3] = 1
    assert pointing_game(volume, box_mask(3, (1, 2, 3), (1, 2, 3))).item() == 1
    assert pointing_game(volume, box_mask(3, (1, 2, 4), (1, 2, 4))).item() == 0
    assert pointing_game(volume, box_mask(3, (1, 2, 4), (1, 2, 4)), tolerance=1).item() == 1


def test_top_k_precision_counts_patches_touching_the_mask():
    maps = torch.zeros(1, 16, 16)
    maps[0, 2, 2], maps[0, 8, 8], maps[0, 13, 13] = 3.0, 2.0, 1.0
    mask = box_mask(2, (0, 0), (1, 1)) | box_mask(2, (14, 14), (15, 15))
    # 3x3 patches around the peaks: (1..3, 1..3) touches (0..1, 0..1); (7..9, 7..9) misses;
    # (12..14, 12..14) touches (14..15, 14..15)
    assert top_k_localisation_precision(maps, mask, k=3, patch_size=3).item() == pytest.approx(2 / 3)
    assert top_k_localisation_precision(maps, mask, k=1, patch_size=1).item() == 0  # (2, 2) alone misses


def test_top_k_precision_suppresses_neighbours_on_a_plateau():
    mask = box_mask(2, (0, 0), (3, 3))
    maps = mask.float()  # one flat blob: every pixel of it is a local maximum
    # far-apart picks: the blob once, then a pixel of the flat background
    assert top_k_localisation_precision(maps, mask, k=2, patch_size=1, min_distance=8).item() == pytest.approx(1 / 2)
    # no suppression beyond the pick itself: both picks land on the blob
    assert top_k_localisation_precision(maps, mask, k=2, patch_size=1, min_distance=1).item() == 1


@pytest.mark.parametrize("dims", [2, 3])
def test_max_box_accuracy_of_a_box_with_known_iou(dims):
    if dims == 2:
        mask, maps = box_mask(2, (2, 2), (7, 11)), box_mask(2, (2, 2), (7, 7)).float()  # 36 of 60 pixels
    else:
        mask, maps = box_mask(3, (0, 0, 0), (3, 4, 2)), box_mask(3, (0, 0, 0), (3, 2, 2)).float()  # 36 of 60 voxels
    # IoU 0.6 for every tau > 0 (tau = 0 selects the whole image, IoU 60 / 256 or 60 / 512):
    # hit at delta 0.3 and 0.5, miss at 0.7
    result = max_box_accuracy(maps, mask, thresholds=10)
    assert result.best_iou[0, 1:].tolist() == pytest.approx([0.6] * 9)
    assert result.max_box_acc.item() == pytest.approx(2 / 3)
    assert gt_localisation(maps, mask).item() == 1
    assert gt_localisation(maps, mask, iou_threshold=0.7).item() == 0


def test_max_box_accuracy_is_the_fraction_of_images_hit():
    masks = torch.cat([box_mask(2, (2, 2), (5, 5)), box_mask(2, (2, 2), (5, 5))])
    maps = torch.cat([box_mask(2, (2, 2), (5, 5)), box_mask(2, (10, 10), (13, 13))]).float()
    result = max_box_accuracy(maps, masks)
    assert result.box_accuracy[:, 1:].max().item() == 0.5 and result.max_box_acc.item() == 0.5


def test_gt_loc_takes_the_largest_component_and_top1_needs_the_right_class():
    mask = box_mask(2, (2, 2), (4, 4))
    small_decoy = mask.float()
    small_decoy[0, 10:12, 10:12] = 0.9  # 4 pixels: the 9-pixel lesion blob is the largest
    large_decoy = mask.float()
    large_decoy[0, 9:13, 9:13] = 0.9  # 16 pixels: the decoy is the largest
    maps, masks = torch.cat([small_decoy, large_decoy]), torch.cat([mask, mask])
    assert gt_localisation(maps, masks).tolist() == [1, 0]
    assert max_box_accuracy(maps, masks).max_box_acc.item() == 1  # every component's box counts there
    labels = torch.tensor([1, 1])
    assert top1_localisation(maps, masks, torch.tensor([1, 1]), labels).tolist() == [1, 0]
    assert top1_localisation(maps, masks, torch.tensor([0, 1]), labels).tolist() == [0, 0]


# --- faithfulness to the model -------------------------------------------------------------------


def summed_logit_model(images: torch.Tensor) -> torch.Tensor:
    """Logits (0, sum(x) - 2): p_1 = sigmoid(sum(x) - 2)."""
    total = images.flatten(1).sum(1)
    return torch.stack([torch.zeros_like(total), total - 2], dim=1)


@pytest.mark.parametrize("dims", [2, 3])
def test_average_drop_and_increase_in_confidence_by_hand(dims):
    spatial = (2, 2, 1)[:dims]
    images = torch.ones(2, 1, *spatial)
    maps = torch.tensor([0.0, 1.0, 1.0, 3.0]).view(1, *spatial).repeat(2, *[1] * dims)  # min-max (0, 1/3, 1/3, 1): sum 5/3
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
    assert curve.fractions.tolist() == [0, 0.25, 0.5, 0.75, 1]
    assert curve.scores[0].tolist() == pytest.approx([1, ratio, ratio, ratio, ratio])
    assert curve.scores[1].tolist() == pytest.approx([1, 1, 1, 1, ratio])
    assert curve.area.tolist() == pytest.approx([0.25 * (0.5 + 3.5 * ratio), 0.25 * (3.5 + 0.5 * ratio)])
    assert curve.area[0] < curve.area[1]


def area_model(images: torch.Tensor) -> torch.Tensor:
    """p_1 = 0.9 * mean(x) + 0.05: on an image of ones, linear in the area left."""
    return logits_from_probability(0.9 * images.flatten(1).mean(1) + 0.05)


@pytest.mark.parametrize("dims", [2, 3])
def test_deletion_and_insertion_areas_of_a_linear_curve(dims):
    images = torch.ones(2, 1, *[4] * dims)
    maps, targets = torch.randn(2, *[4] * dims), torch.tensor([1, 1])
    # deletion: p'/p = (0.95 - 0.9 f) / 0.95, area (0.95 - 0.45) / 0.95;
    # insertion: p'/p = (0.05 + 0.9 f) / 0.95, area (0.05 + 0.45) / 0.95
    for num_steps in (None, 4):
        deletion = deletion_curve(area_model, images, maps, targets, patch_size=2, num_steps=num_steps)
        insertion = insertion_curve(area_model, images, maps, targets, patch_size=2, num_steps=num_steps)
        assert deletion.area.tolist() == pytest.approx([0.5 / 0.95] * 2)
        assert insertion.area.tolist() == pytest.approx([0.5 / 0.95] * 2)
        assert insertion.scores[:, 0].tolist() == pytest.approx([0.05 / 0.95] * 2)
    assert len(deletion.fractions) == 5  # num_steps=4 of 2^dims patches


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
    layers = len(parameterised_modules(model))
    correlation = parameter_randomisation_correlation(model, input_gradient, images, targets, num_layers=layers, seed=1)
    assert (correlation < 0.5).all()
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in before.items())  # original untouched
    unchanged = parameter_randomisation_correlation(model, lambda m, x, t: x[:, 0] ** 2, images, targets, num_layers=layers)
    assert unchanged.tolist() == pytest.approx([1.0] * 3)


def test_randomise_top_layers_changes_only_the_last_modules():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Conv2d(2, 2, 1), torch.nn.Conv2d(2, 2, 1))
    copy = randomise_top_layers(model, 2, seed=0)
    assert torch.equal(copy[0].weight, model[0].weight)
    assert not torch.equal(copy[2].weight, model[2].weight) and not torch.equal(copy[3].weight, model[3].weight)
    assert torch.equal(randomise_top_layers(model, 2, seed=0)[3].weight, copy[3].weight)  # seeded: reproducible
    with pytest.raises(ValueError):
        randomise_top_layers(model, 4)


@pytest.mark.parametrize("dims", [2, 3])
def test_evidence_sign_consistency_on_signed_maps(dims):
    diseased_map = torch.tensor([1.0, 2.0, -1.0, 0.0]).view(1, *[2, 2, 1][:dims]).expand(1, *[2] * dims)
    healthy_map = torch.tensor([-1.0, -3.0, 1.0, 0.0]).view(1, *[2, 2, 1][:dims]).expand(1, *[2] * dims)
    maps, diseased = torch.cat([diseased_map, healthy_map]), torch.tensor([True, False])
    # area: 2 of 4 locations agree in both; mass: 3 of 4 (diseased), 4 of 5 (healthy)
    assert evidence_sign_consistency(maps, diseased).tolist() == pytest.approx([0.5, 0.5])
    assert evidence_sign_consistency(maps, diseased, by="mass").tolist() == pytest.approx([3 / 4, 4 / 5])
