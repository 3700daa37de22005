import math

import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from torch.nn import functional as F

from bundle.losses import SigmoidBranchLoss
from bundle.networks import ClassEvidenceHead, LinearHead, classifier
from bundle.networks.sigmoid_branch import BranchInferer, SigmoidBranchClassifier, sigmoid_branch_classifier

TINY = {
    "backbone": "resnet10",
    "num_classes": 3,
    "backbone_kwargs": {"widen_factor": 0.125, "no_max_pool": True, "conv1_t_stride": 1},
}


def baseline(head: str, spatial_dims: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return classifier(spatial_dims=spatial_dims, head=head, **TINY)


def images(spatial_dims: int = 2, n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, *([16] * spatial_dims), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("head", ["softcam", "linear"])
def test_branch_is_a_fresh_head_of_the_same_kind_and_the_rest_is_frozen(head):
    model = SigmoidBranchClassifier.from_classifier(baseline(head))
    assert type(model.branch) is type(model.head) is {"softcam": ClassEvidenceHead, "linear": LinearHead}[head]
    head_state, branch_state = model.head.state_dict(), model.branch.state_dict()
    assert head_state.keys() == branch_state.keys()
    assert all(head_state[k].shape == branch_state[k].shape for k in head_state)
    assert not any(torch.equal(head_state[k], branch_state[k]) for k in head_state)  # freshly initialised
    assert not any(p.requires_grad for p in (*model.features.parameters(), *model.head.parameters()))
    assert all(p.requires_grad for p in model.branch.parameters())
    model.train()
    assert model.training and model.branch.training
    assert not any(m.training for m in (*model.features.modules(), *model.head.modules()))


@pytest.mark.parametrize("head", ["softcam", "linear"])
def test_baseline_checkpoint_keys_load_unchanged_and_forward_returns_the_original_logits(head, tmp_path):
    trained = baseline(head).eval()
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    model = sigmoid_branch_classifier(path, spatial_dims=2, head=head, **TINY).eval()
    # the wrapper's keys are the baseline's own plus branch.*
    assert set(model.state_dict()) == set(trained.state_dict()) | {f"branch.{k}" for k in model.branch.state_dict()}
    fresh = SigmoidBranchClassifier.from_classifier(baseline(head, seed=5))
    missing, unexpected = fresh.load_state_dict(trained.state_dict(), strict=False)
    assert unexpected == [] and set(missing) == {k for k in fresh.state_dict() if k.startswith("branch.")}
    x = images()
    with torch.no_grad():
        expected = trained(x)
        assert torch.equal(model(x), expected)
        logits, branch_logits = model.forward_with_branch(x)
        assert torch.equal(logits, expected)
        assert torch.allclose(branch_logits, model(x, branch=True)) and torch.allclose(branch_logits, BranchInferer()(x, model))
        assert not torch.allclose(branch_logits, logits)
        logits, branch_maps = model.forward_with_branch_maps(x)
        assert torch.equal(logits, expected)
        # the branch's class maps (at feature resolution) average to its logits
        assert branch_maps.shape[:2] == (4, 3) and branch_maps.shape[2:] == model.features(x).shape[2:]
        assert torch.allclose(branch_maps.flatten(2).mean(2), branch_logits, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("head", ["softcam", "linear"])
def test_a_plain_monai_trainer_trains_only_the_branch(head, spatial_dims):
    model = SigmoidBranchClassifier.from_classifier(baseline(head, spatial_dims))
    x = images(spatial_dims, n=8)
    model.eval()
    with torch.no_grad():
        logits_before = model(x)
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("branch.")}
    branch_before = {k: v.clone() for k, v in model.branch.state_dict().items()}
    assert any(k.endswith("running_mean") for k in frozen_before)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    data = [{"image": x[i], "label": labels[i]} for i in range(len(x))]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=DataLoader(Dataset(data), batch_size=4, shuffle=True),
        network=model,
        # every parameter, with weight decay: the frozen ones get no gradient, so they must stay put anyway
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
        loss_function=SigmoidBranchLoss(),
        inferer=BranchInferer(),
    )
    trainer.run()
    assert trainer.state.iteration == 4
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), logits_before)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())  # weights and BatchNorm running stats
    assert all(not torch.equal(model.branch.state_dict()[k], v) for k, v in branch_before.items())


def test_sigmoid_branch_loss_is_the_class_balanced_bce_of_the_paper():
    z = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 0.8, -2.0]])
    y = [0, 2]
    c = 3
    total = 0.0
    for i in range(2):
        for k in range(c):
            s = 1 / (1 + math.exp(-z[i, k].item()))
            positive = 1.0 if y[i] == k else 0.0
            total += (c - 1) * positive * math.log(s) + (1 - positive) * math.log(1 - s)
    expected = -total / (2 * c)
    loss = SigmoidBranchLoss()
    assert loss(z, torch.tensor(y)).item() == pytest.approx(expected, rel=1e-6)
    assert loss(z, torch.tensor(y).view(2, 1)).item() == pytest.approx(expected, rel=1e-6)  # MONAI collates (B, 1) too
    # two classes: the positive weight is 1, plain binary cross-entropy on one-hot labels
    z2, y2 = torch.tensor([[0.2, -0.7]]), torch.tensor([1])
    assert loss(z2, y2).item() == pytest.approx(F.binary_cross_entropy_with_logits(z2, torch.tensor([[0.0, 1.0]])).item())
