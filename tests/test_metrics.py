"""Classification metrics, map normalisation, connected components and localisation against masks,
on hand-made inputs whose answers are worked out by hand."""

import math

import pytest
import torch

from bundle.explain.boxes import (
    _propagate_labels,
    find_components,
    gt_localisation,
    label_components,
    mask_boxes,
    max_box_accuracy,
    threshold_grid,
    top1_localisation,
)
from bundle.explain.localisation import (
    activation_precision,
    activation_sensitivity,
    pointing_game,
    pxap,
    pxap_dataset,
    top_k_localisation_precision,
)
from bundle.explain.metrics import (
    accuracy,
    balanced_accuracy,
    cohen_kappa,
    minmax_scale,
    roc_auc,
    saliency,
)

SHAPES = {2: (16, 16), 3: (8, 8, 8)}


def box_mask(dims: int, low: tuple, high: tuple) -> torch.Tensor:
    """A (1, *spatial) bool mask, true on the inclusive box low..high."""
    mask = torch.zeros(1, *SHAPES[dims], dtype=torch.bool)
    mask[(0, *[slice(a, b + 1) for a, b in zip(low, high)])] = True
    return mask


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
    rectified = saliency(maps)  # ReLU first: the negative value and zero both become 0
    assert torch.equal(rectified[0], torch.tensor([[0.0, 0.0], [1 / 3, 1.0]]))
    assert torch.equal(saliency(-maps[1:]), torch.zeros(1, 2, 2))  # no positive evidence: points nowhere


def count_components(labels: torch.Tensor) -> list[int]:
    return [len(image[image > 0].unique()) for image in labels]


@pytest.mark.parametrize("label", [label_components, _propagate_labels])
def test_label_components_2d_joins_diagonal_neighbours(label):
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
    labels = label(torch.stack([image, torch.zeros_like(image), torch.ones_like(image)]))
    assert count_components(labels) == [4, 0, 1]
    assert labels[0, 0, 0] == labels[0, 1, 1]  # touching only at a corner
    assert labels[0, 1, 4] == labels[0, 1, 5] == labels[0, 2, 4]
    assert labels[0, 0, 0] != labels[0, 4, 0]
    components = find_components(torch.stack([image, torch.zeros_like(image), torch.ones_like(image)]))
    assert components.image.tolist() == [0, 0, 0, 0, 2]  # ordered by image, then by first voxel
    found = [(tuple(box.tolist()), int(size)) for box, size in zip(components.boxes, components.sizes)]
    assert found == [((0, 0, 1, 1), 2), ((1, 4, 2, 5), 3), ((4, 0, 4, 1), 2), ((4, 5, 4, 5), 1), ((0, 0, 4, 5), 30)]


@pytest.mark.parametrize("label", [label_components, _propagate_labels])
def test_label_components_follows_a_long_winding_path(label):
    path = torch.zeros(15, 15, dtype=torch.bool)
    path[::2] = True  # rows 0, 2, ..., 14, joined alternately at the right and left ends: one 127-pixel path
    for row in range(1, 15, 2):
        path[row, 14 if row % 4 == 1 else 0] = True
    cut = path.clone()
    cut[7, 0] = False  # break it in the middle: two components
    labels = label(torch.stack([path, cut]))
    assert count_components(labels) == [1, 2]
    assert (labels[0][path] == labels[0, 0, 0]).all()


@pytest.mark.parametrize("label", [label_components, _propagate_labels])
def test_label_components_3d_joins_corner_neighbours_and_boxes_are_cuboids(label):
    volume = torch.zeros(1, 5, 5, 5, dtype=torch.bool)
    volume[0, 0, 0, 0] = volume[0, 1, 1, 1] = True  # touch at a corner only: one component
    volume[0, 3, 0, 0:2] = True
    volume[0, 4, 4, 4] = True
    labels = label(volume)
    assert count_components(labels) == [3]
    assert labels[0, 0, 0, 0] == labels[0, 1, 1, 1]
    boxes, valid = mask_boxes(volume)
    found = {tuple(box.tolist()) for box, ok in zip(boxes[0], valid[0]) if ok}
    assert found == {(0, 0, 0, 1, 1, 1), (3, 0, 0, 3, 0, 1), (4, 4, 4, 4, 4, 4)}


def canonical(labels: torch.Tensor) -> torch.Tensor:
    """Each voxel labelled by the first (raster-order) voxel of its component, -1 on the background."""
    flat = labels.flatten(1)
    index = torch.arange(flat.shape[1]).expand_as(flat)
    first = torch.full((len(flat), flat.shape[1] + 1), flat.shape[1]).scatter_reduce(1, flat, index, "amin")
    return torch.where(flat > 0, first.gather(1, flat), -1)


@pytest.mark.parametrize("dims", [2, 3])
def test_scipy_and_torch_labelling_agree_on_random_images(dims):
    foreground = torch.rand(4, *[12] * dims, generator=torch.Generator().manual_seed(dims)) > 0.55
    scipy_labels, torch_labels = label_components(foreground), _propagate_labels(foreground)
    assert torch.equal(canonical(scipy_labels), canonical(torch_labels))
    assert 1 <= scipy_labels[foreground].min() and scipy_labels.flatten(1).amax(1).max() <= 12**dims


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
    # a one-lesion image smaller than the patch spacing: only picks above the threshold count, so
    # k = 3 does not cap the precision at 1/3 (two more picks would land on the empty background)
    assert top_k_localisation_precision(maps, mask, k=3, patch_size=3).precision.item() == 1
    small = box_mask(dims, (3,) * dims, (4,) * dims)
    assert top_k_localisation_precision(small.float(), small, k=3, patch_size=5).precision.item() == 1
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


def test_top_k_precision_counts_patches_touching_the_mask_pooled_over_picks():
    maps = torch.zeros(2, 16, 16)
    maps[0, 2, 2], maps[0, 8, 8], maps[0, 13, 13] = 3.0, 2.0, 1.0
    maps[1, 9, 9] = 5.0
    mask = box_mask(2, (0, 0), (1, 1)) | box_mask(2, (14, 14), (15, 15))
    masks = torch.cat([mask, mask])
    # image 0: 3x3 patches around the peaks: (1..3, 1..3) touches (0..1, 0..1); (7..9, 7..9) misses;
    # (12..14, 12..14) touches (14..15, 14..15); image 1: one pick above 0, (8..10, 8..10), misses
    result = top_k_localisation_precision(maps, masks, k=3, patch_size=3)
    assert result.hits.tolist() == [2, 0] and result.picks.tolist() == [3, 1]
    assert result.precision.item() == pytest.approx(2 / 4)  # pooled over the 4 picks, not the mean of 2/3 and 0
    single = top_k_localisation_precision(maps, masks, k=1, patch_size=1)  # (2, 2) alone misses
    assert single.hits.tolist() == [0, 0] and single.picks.tolist() == [1, 1]
    assert top_k_localisation_precision(maps, masks, k=3, patch_size=3, threshold=1.5).picks.tolist() == [2, 1]


def test_top_k_precision_picks_only_evidence_above_the_threshold_and_suppresses_neighbours():
    mask = box_mask(2, (0, 0), (3, 3))
    maps = mask.float() - 0.5 * (~mask).float()  # +1 on the lesion, negative evidence elsewhere
    maps[0, 12, 12] = -0.2  # a local peak of the negative background
    # one flat blob: its first pixel is picked, the rest of it lies within 4 pixels of a pixel visited
    # before it and is suppressed; the negative background is never picked however large k is
    far = top_k_localisation_precision(maps, mask, k=5, patch_size=1, min_distance=4)
    assert far.picks.tolist() == [1] and far.precision.item() == 1
    near = top_k_localisation_precision(maps, mask, k=5, patch_size=1, min_distance=1)  # no suppression
    assert near.picks.tolist() == [5] and near.precision.item() == 1
    # with every value allowed, the background's peak is picked as well (its plateau is suppressed from
    # the lesion on, as the reference suppresses around every visited pixel, picked or not)
    everything = top_k_localisation_precision(maps, mask, k=5, patch_size=1, min_distance=4, threshold=-math.inf)
    assert everything.picks.tolist() == [2] and everything.hits.tolist() == [1]
    healthy = top_k_localisation_precision(maps, torch.zeros_like(mask), k=3, patch_size=1)
    assert math.isnan(healthy.picks.item()) and math.isnan(healthy.precision.item())  # nothing to localise


def test_top_k_precision_in_3d_counts_cuboid_patches():
    mask = box_mask(3, (0, 0, 0), (1, 1, 1))
    maps = torch.zeros(1, 8, 8, 8)
    maps[0, 2, 2, 2], maps[0, 6, 6, 6] = 2.0, 1.0  # a 3^3 patch around (2, 2, 2) reaches (1, 1, 1); (6, 6, 6)'s does not
    result = top_k_localisation_precision(maps, mask, k=2, patch_size=3)
    assert result.hits.tolist() == [1] and result.picks.tolist() == [2]


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


def signed_lesion_map() -> tuple[torch.Tensor, torch.Tensor]:
    """A 16 x 16 map: +1 on a 4 x 4 lesion, 0 (no evidence) on a 6 x 6 region touching it, -1 elsewhere."""
    mask = box_mask(2, (2, 2), (5, 5))
    maps = -torch.ones(1, 16, 16)
    maps[0, 2:6, 6:12] = 0.0
    maps[mask] = 1.0
    return maps, mask


def test_box_metrics_rectify_signed_maps_so_zero_evidence_is_background():
    maps, mask = signed_lesion_map()
    # min-max of the signed map would put the zero region at 0.5: at tau 0.2 it joins the lesion (IoU 16 / 40)
    assert gt_localisation(maps, mask).item() == 1
    assert top1_localisation(maps, mask, torch.tensor([1]), torch.tensor([1])).item() == 1
    result = max_box_accuracy(maps, mask)
    assert result.best_iou[0, 1:].tolist() == pytest.approx([1.0] * 99)  # every tau > 0 isolates the lesion
    assert torch.equal(result.best_iou, max_box_accuracy(maps.clamp(min=0), mask).best_iou)


def test_pxap_and_activation_precision_read_only_the_positive_evidence():
    mask = box_mask(2, (0, 0), (3, 3))  # 16 of 256 pixels
    maps = -torch.ones(1, 16, 16)
    maps[0, 0:2, 0:4] = 1.0  # half the lesion has positive evidence
    maps[0, 2:4, 0:4] = -0.5  # the other half negative: no evidence for the lesion, ranked with the background
    # positive half alone: precision 1 at recall 1/2; then every pixel: precision 16 / 256 at recall 1
    assert pxap(maps, mask).item() == pytest.approx(0.5 + 0.5 * 16 / 256)
    assert pxap_dataset(maps, mask).item() == pytest.approx(0.5 + 0.5 * 16 / 256)
    assert activation_precision(maps, mask).item() == 1


def test_box_accuracy_reads_tau_in_steps_of_a_hundredth():
    mask = box_mask(2, (2, 2), (5, 5))
    maps = mask.float()
    maps[0, 2:6, 6:12] = 0.97  # only 0.97 < tau <= 1 isolates the lesion: 0.98 and 0.99 of the default grid
    assert threshold_grid(100)[1].item() == pytest.approx(0.01)
    result = max_box_accuracy(maps, mask)
    assert len(result.thresholds) == 100 and result.max_box_acc.item() == 1
    assert result.box_accuracy[1].tolist() == [0.0] * 98 + [1.0] * 2  # delta 0.5 (IoU 16 / 40 below tau 0.98)
    assert torch.equal(result.largest_box_accuracy, result.box_accuracy)  # one component at every tau
    assert max_box_accuracy(maps, mask, thresholds=20).max_box_acc.item() < 1  # steps of 0.05 miss it
