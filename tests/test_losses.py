import pytest
import torch
from torch.nn import functional as F

from bundle.losses import SoftCAMLoss, classification_loss, evidence_penalty
from bundle.networks import classifier


def test_penalty_is_the_batch_mean_of_each_images_elastic_net():
    maps = torch.tensor([[[[1.0, -2.0], [0.0, 2.0]]], [[[3.0, 0.0], [0.0, -4.0]]]])  # (2, 1, 2, 2)
    # image 0: L1 5, L2 3; image 1: L1 7, L2 5
    l1, l2 = 0.1, 0.01
    expected = ((l1 * 5 + l2 * 3) + (l1 * 7 + l2 * 5)) / 2
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
