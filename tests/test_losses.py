import pytest
import torch
from torch.nn import functional as F

from bundle.losses import SoftCAMLoss, classification_loss, evidence_penalty
from bundle.networks import classifier


def test_penalty_is_the_batch_mean_of_each_images_elastic_net_per_map_element():
    maps = torch.tensor([[[[1.0, -2.0], [0.0, 2.0]]], [[[3.0, 0.0], [0.0, -4.0]]]])  # (2, 1, 2, 2)
    # 4 elements per image. Image 0: sum|A| 5, Frobenius 3 -> mean|A| 5/4, RMS 3/2;
    # image 1: sum|A| 7, Frobenius 5 -> mean|A| 7/4, RMS 5/2
    l1, l2 = 0.1, 0.01
    expected = ((l1 * 5 / 4 + l2 * 3 / 2) + (l1 * 7 / 4 + l2 * 5 / 2)) / 2
    assert evidence_penalty(maps, l1, l2).item() == pytest.approx(expected)
    assert evidence_penalty(maps, l1, 0.0).item() == pytest.approx(0.1 * 3 / 2)
    assert evidence_penalty(maps, 0.0, l2).item() == pytest.approx(0.01 * 2)


def test_penalty_carries_across_map_sizes_and_class_counts():
    # Evidence of the same per-element magnitude costs the same on a 2 x 8 x 8 map as on a
    # 3 x 16 x 16 or a 2 x 4 x 4 x 3 map, as the summed reference penalty would not (128 vs 768 elements).
    value = 0.5
    small, large, volume = torch.full((1, 2, 8, 8), value), torch.full((1, 3, 16, 16), -value), torch.full((2, 2, 4, 4, 3), value)
    for l1, l2 in ((1e-2, 0.0), (0.0, 1e-3), (3e-2, 9e-4)):
        expected = (l1 + l2) * value  # mean |A| = RMS = 0.5 for a constant map
        for maps in (small, large, volume):
            assert evidence_penalty(maps, l1, l2).item() == pytest.approx(expected)


def test_every_image_in_the_batch_is_regularised():
    maps = torch.randn(4, 2, 3, 3, requires_grad=True)
    evidence_penalty(maps, 1e-3, 1e-4).backward()
    assert all(maps.grad[i].abs().sum() > 0 for i in range(4))
    # changing only the last image changes the penalty (the reference code looked at image 0 only)
    changed = maps.detach().clone()
    changed[3] *= 3
    assert evidence_penalty(changed, 1e-3, 1e-4) > evidence_penalty(maps.detach(), 1e-3, 1e-4)


def test_softcam_loss_is_cross_entropy_plus_penalty_of_the_same_forward_pass():
    torch.manual_seed(0)
    net = classifier("resnet10", head="softcam")
    loss_fn = SoftCAMLoss(net, lambda1=1e-3, lambda2=1e-4)
    x, y = torch.randn(3, 1, 32, 32), torch.tensor([0, 1, 1])
    logits = net(x)
    expected = F.cross_entropy(logits, y) + evidence_penalty(net.evidence_maps, 1e-3, 1e-4)
    assert loss_fn(logits, y.view(3, 1)).item() == pytest.approx(expected.item())
    assert not any(n.startswith("network") for n, _ in loss_fn.named_parameters())


def test_dense_softcam_without_penalty_is_plain_cross_entropy():
    net = classifier("resnet10", head="softcam")
    x, y = torch.randn(2, 1, 32, 32), torch.tensor([1, 0])
    logits = net(x)
    assert SoftCAMLoss(net, 0.0, 0.0)(logits, y).item() == pytest.approx(F.cross_entropy(logits, y).item())


def test_the_loss_follows_the_head_switch():
    net = classifier("resnet10", head="linear")
    loss = classification_loss(net, "linear", 1e-3, 1e-4)
    logits = net(torch.randn(2, 1, 32, 32))
    y = torch.tensor([[1], [0]])
    assert loss(logits, y).item() == pytest.approx(F.cross_entropy(logits, y.view(-1)).item())
    with pytest.raises(ValueError):
        SoftCAMLoss(net, lambda1=-1.0)
