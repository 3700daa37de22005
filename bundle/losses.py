"""SoftCAM's ElasticNet-regularised cross-entropy."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bundle.networks.classifier import ImageClassifier


def evidence_penalty(evidence_maps: torch.Tensor, lambda1: float, lambda2: float) -> torch.Tensor:
    """ElasticNet penalty on class evidence maps (B, C, h, w[, d]), averaged over the batch.

    Per image i with N = C*h*w[*d] map elements: lambda1 * mean|A_i| + lambda2 * sqrt(mean(A_i^2)),
    i.e. the SoftCAM reference's lambda1 * ||A_i||_1 + lambda2 * ||A_i||_2 (L1 norm and plain, not
    squared, Frobenius norm) with the L1 norm divided by N and the Frobenius norm by sqrt(N). Both
    terms are then per map element: the same lambda means the same pull on evidence of the same
    magnitude whatever the input size, output stride or number of classes, where the reference's
    sums grow with the map (a reference value corresponds to this one times N, resp. sqrt(N)).
    Every image of the batch counts; the reference code only regularised the first one. The batch
    mean keeps the penalty's scale independent of the batch size.
    """
    flat = evidence_maps.flatten(1)
    # the norm divided by sqrt(N), not sqrt(mean(A^2)): torch's norm has a zero gradient at A = 0
    per_image = lambda1 * flat.abs().mean(dim=1) + lambda2 * flat.norm(p=2, dim=1) / flat.shape[1] ** 0.5
    return per_image.mean()


class SoftCAMLoss(nn.Module):
    """Cross-entropy on the logits + ElasticNet penalty on the evidence maps of the same forward pass.

    ``network`` is the SoftCAM classifier being trained: the loss reads the evidence maps it kept,
    so MONAI's trainer can call ``loss(logits, labels)`` unchanged.
    """

    def __init__(self, network: ImageClassifier, lambda1: float = 0.0, lambda2: float = 9e-4):
        super().__init__()
        if lambda1 < 0 or lambda2 < 0:
            raise ValueError(f"lambda1 and lambda2 must be >= 0, got {lambda1}, {lambda2}")
        self.network = [network]  # a list, so the network is not registered as a submodule twice
        self.lambda1 = lambda1
        self.lambda2 = lambda2

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        maps = self.network[0].evidence_maps
        if maps.shape[0] != logits.shape[0]:
            raise RuntimeError("evidence maps and logits come from different forward passes")
        ce = F.cross_entropy(logits, labels.reshape(-1).long())
        return ce + evidence_penalty(maps, self.lambda1, self.lambda2)


def classification_loss(network: ImageClassifier, head: str, lambda1: float, lambda2: float) -> nn.Module:
    """The training loss matching the head: SoftCAM loss for "softcam", plain cross-entropy otherwise."""
    if head == "softcam":
        return SoftCAMLoss(network, lambda1=lambda1, lambda2=lambda2)
    return _CrossEntropy()


class _CrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy accepting labels shaped (B,) or (B, 1), as MONAI's collate yields both."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(logits, labels.reshape(-1).long())


class SigmoidBranchLoss(nn.Module):
    """Class-balanced binary cross-entropy for the dual-branch sigmoid head (Oh & Noh, BMVC 2025).

    L = -1/(B*C) * sum_i sum_k [(C-1) * y_ik * log s(z_ik) + (1 - y_ik) * log(1 - s(z_ik))]
    with y the one-hot labels and z the branch logits (B, C): each class is its own sigmoid
    problem, and the single positive per image is weighted C-1 against the C-1 negatives.
    Called as MONAI's trainer calls a loss, ``loss(branch_logits, labels)``; labels (B,) or (B, 1).
    """

    def forward(self, branch_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        num_classes = branch_logits.shape[1]
        one_hot = F.one_hot(labels.reshape(-1).long(), num_classes).to(branch_logits.dtype)
        pos_weight = branch_logits.new_full((num_classes,), num_classes - 1)
        return F.binary_cross_entropy_with_logits(branch_logits, one_hot, pos_weight=pos_weight)
