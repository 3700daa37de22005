"""Dual-branch sigmoid head (Oh & Noh, BMVC 2025) on a trained classifier of either head.

Softmax ignores a constant added to every logit, so the class weights (or gradients) that
CAM-style maps are built from are not pinned down by the prediction. The repair: keep the trained
classifier frozen as it is (its softmax head still predicts the class k*), add a second head of the
same kind and shape, freshly initialised, and train only that branch with per-class sigmoid outputs
(``bundle.losses.SigmoidBranchLoss``). Explanations then take their channel weights from the
branch's raw logit z_k* (the explanation target ``bundle.explain.targets.BranchLogit``, "branch").
On a SoftCAM classifier the branch is a second 1x1(x1) class evidence layer: the "sigmoid
evidence branch".

State dict: the wrapper *is* an ``ImageClassifier`` with one more submodule, so its keys are the
baseline's own (``features.*``, ``head.*``) plus ``branch.*``. A baseline checkpoint therefore loads
into ``features``/``head`` under the names it was saved with, and everything that takes an
``ImageClassifier`` (evaluators, inference, the evidence gallery) sees the original classifier.

Training with a plain MONAI ``SupervisedTrainer``: ``forward(x)`` always returns the ORIGINAL head's
logits; ``forward(x, branch=True)`` returns the branch's. ``BranchInferer`` is the trainer's (and,
to select the best branch by its own AUC, the evaluator's) inferer: it calls the network with
``branch=True``, through the network's ``__call__`` so DDP wrappers still synchronise gradients.
The optimiser should get ``network.branch.parameters()``; the frozen parts have
``requires_grad=False`` and no gradient, so even an optimiser given every parameter leaves them be.
"""

from __future__ import annotations

from pathlib import Path

import torch
from monai.inferers import Inferer
from torch import nn

from bundle.checkpoints import load_checkpoint
from bundle.networks.backbones import BackboneFeatures
from bundle.networks.classifier import ImageClassifier, classifier


def fresh_head_like(head: nn.Module, features: BackboneFeatures) -> nn.Module:
    """A head of the same class and shape as ``head`` with newly initialised parameters, on its device.

    Built from the heads' shared constructor contract (num_features, num_classes, spatial_dims) rather
    than deep-copied, since a SoftCAM head may hold the evidence maps (with autograd history) of its
    last forward pass.
    """
    parameter = next(head.parameters())
    probe = torch.zeros((1, features.num_features) + (1,) * features.spatial_dims, dtype=parameter.dtype, device=parameter.device)
    with torch.no_grad():
        num_classes = head.class_maps(probe).shape[1]
    branch = type(head)(features.num_features, num_classes, features.spatial_dims)
    return branch.to(device=parameter.device, dtype=parameter.dtype)


class SigmoidBranchClassifier(ImageClassifier):
    """A frozen trained classifier plus a trainable sigmoid branch of the same head type.

    - ``forward(x)`` -> original logits (B, C); ``forward(x, branch=True)`` -> branch logits (B, C).
    - ``forward_with_branch(x)`` -> (logits, branch_logits) from one backbone pass.
    - ``forward_with_branch_maps(x)`` -> (logits, branch class maps (B, C, h, w[, d])): the CAM of a
      linear branch (bias included, as ``LinearHead.class_maps``) or the signed evidence maps of a
      SoftCAM branch, whose spatial mean is the branch logit.
    - ``forward_with_maps`` / ``evidence_maps`` are the original head's, as for ``ImageClassifier``.

    ``features`` and ``head`` get ``requires_grad=False`` and stay in eval mode (BatchNorm running
    statistics frozen) even after ``.train()``; only ``branch`` trains.
    """

    evidence_maps = ImageClassifier.evidence_maps  # defined here too, for TorchScript (see ImageClassifier)

    def __init__(self, features: BackboneFeatures, head: nn.Module):
        super().__init__(features, head)
        self.branch = fresh_head_like(head, features)
        for parameter in (*features.parameters(), *head.parameters()):
            parameter.requires_grad_(False)
        self.train(self.training)

    @classmethod
    def from_classifier(cls, model: ImageClassifier) -> SigmoidBranchClassifier:
        """Wrap a trained classifier. Its ``features`` and ``head`` modules are shared, not copied,
        and are frozen in place; its ``build_options`` are carried over."""
        wrapped = cls(model.features, model.head)
        wrapped.build_options = dict(model.build_options)
        return wrapped

    def train(self, mode: bool = True) -> SigmoidBranchClassifier:
        super().train(mode)
        self.features.eval()  # frozen: BatchNorm must keep using (and not update) its running statistics
        self.head.eval()
        return self

    def forward(self, x: torch.Tensor, branch: bool = False) -> torch.Tensor:
        """Logits (B, C) of the original head, or of the sigmoid branch with ``branch=True``."""
        features = self.features(x)
        return self.branch(features) if branch else self.head(features)

    def forward_with_branch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(original logits, branch logits), each (B, C), from one backbone pass."""
        features = self.features(x)
        return self.head(features), self.branch(features)

    def forward_with_branch_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Original logits (B, C) (their arg-max is the class k* to explain) and the branch's class
        maps (B, C, h, w[, d]) at feature resolution, from one backbone pass."""
        features = self.features(x)
        return self.head(features), self.branch.class_maps(features)


class BranchInferer(Inferer):
    """MONAI inferer that runs a ``SigmoidBranchClassifier``'s branch: ``network(inputs, branch=True)``."""

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        return network(inputs, *args, branch=True, **kwargs)


def sigmoid_branch_classifier(baseline_checkpoint: str | Path | None = None, **options) -> SigmoidBranchClassifier:
    """Build the baseline saved in ``baseline_checkpoint`` (by the training config; every key must match),
    load its trained weights and add a fresh sigmoid branch.

    ``options``: ``bundle.networks.classifier`` arguments, and ``image_size`` / ``window``; a baseline that
    describes itself must agree with them (``bundle.checkpoints.network_for_checkpoint``), one that does not is
    built with them. Without a checkpoint (e.g. to load a whole wrapper checkpoint later) the baseline is
    ``classifier(**options)`` with its initial weights."""
    from bundle.checkpoints import network_for_checkpoint

    if baseline_checkpoint is None:
        return SigmoidBranchClassifier.from_classifier(classifier(**{k: v for k, v in options.items()
                                                                     if k not in ("image_size", "window")}))
    model = network_for_checkpoint(baseline_checkpoint, branch=False, **options)
    load_checkpoint(model, baseline_checkpoint)
    return SigmoidBranchClassifier.from_classifier(model)
