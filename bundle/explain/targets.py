"""What an explanation explains: a target, passed to any explainer (as pytorch-grad-cam's
``ClassifierOutputTarget``), instead of flags threaded through the methods.

A target names a set of C class scores of a classifier and, for each image, one class k is explained:

| target | scores (B, C) | class maps (B, C, h, w[, d]) | explaining head |
| --- | --- | --- | --- |
| ``HeadLogit()`` "the head's logit k" | the softmax head's logits | SoftCAM evidence E / CAM of a linear head | ``model.head`` |
| ``BranchLogit()`` "the sigmoid branch's logit k" (Oh & Noh) | the branch's logits | the branch's maps | ``model.branch`` |
| ``ContrastLogit()`` "the contrast map of k" | z_k - mean_{j != k} z_j | E_k - mean_{j != k} E_j | ``model.head`` |

Gradient and perturbation methods explain ``scores`` (a module from images to (B, C)); SoftCAM
reads ``class_maps``; CAM reads the class weight rows of ``weight_layer``; the sanity check
re-initialises ``explaining_head``. ``clamps_channel_weights``: Oh & Noh's rule for the CAM family on
a sigmoid branch, M = ReLU(sum_d max(w_d, 0) F_d). ``TARGETS`` maps config names to targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bundle.networks.classifier import ClassEvidenceHead, ImageClassifier, LinearHead, class_evidence
from bundle.networks.sigmoid_branch import SigmoidBranchClassifier


class _Scores(nn.Module):
    """A classifier seen as a model whose output is a target's class scores (B, C)."""

    def __init__(self, model: ImageClassifier, branch: bool, contrast: bool):
        super().__init__()
        self.model, self.branch, self.contrast = model, branch, contrast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x, branch=True) if self.branch else self.model(x)
        return class_evidence(logits, "contrast") if self.contrast else logits


def _class_weight_layer(head: nn.Module) -> nn.Module:
    """The layer holding a head's (C, D) class weights: ``fc`` of a linear head, SoftCAM's 1x1 evidence conv."""
    if isinstance(head, LinearHead):
        return head.fc
    if isinstance(head, ClassEvidenceHead):
        return head.class_evidence_layer
    raise TypeError(f"no class weight layer known for a {type(head).__name__}")


@dataclass(frozen=True)
class HeadLogit:
    """The softmax head's logit of class k (the classifier's own prediction score)."""

    name: ClassVar[str] = "logit"
    title: ClassVar[str] = "logit"
    branch: ClassVar[bool] = False
    contrast: ClassVar[bool] = False
    clamps_channel_weights: ClassVar[bool] = False

    def check(self, model: nn.Module) -> None:
        """Raise if ``model`` cannot give this target's scores."""

    def explaining_head(self, model: ImageClassifier) -> nn.Module:
        """The head whose class scores are explained (re-initialised by the sanity check)."""
        return model.branch if self.branch else model.head

    def scores(self, model: ImageClassifier) -> nn.Module:
        """A module: images (B, Ch, *S) -> the explained class scores (B, C)."""
        self.check(model)
        return model if not (self.branch or self.contrast) else _Scores(model, self.branch, self.contrast)

    def class_maps(self, model: ImageClassifier, images: torch.Tensor) -> torch.Tensor:
        """Class maps (B, C, h, w[, d]) whose spatial mean is ``scores`` (SoftCAM evidence, CAM of a linear head)."""
        self.check(model)
        _, maps = model.forward_with_branch_maps(images) if self.branch else model.forward_with_maps(images)
        return class_evidence(maps, "contrast" if self.contrast else "raw")

    def weight_layer(self, model: ImageClassifier) -> nn.Module:
        """The layer whose weight rows are the class weights of ``scores`` (CAM)."""
        if self.contrast:
            raise ValueError("the contrast target has no class weight layer of its own: CAM explains a head's or branch's logit")
        return _class_weight_layer(self.explaining_head(model))


@dataclass(frozen=True)
class BranchLogit(HeadLogit):
    """The sigmoid branch's raw logit of class k (Oh & Noh): channel weights clamped at 0 in the CAM family."""

    name: ClassVar[str] = "branch"
    title: ClassVar[str] = "sigmoid branch logit"
    branch: ClassVar[bool] = True
    clamps_channel_weights: ClassVar[bool] = True

    def check(self, model: nn.Module) -> None:
        if not isinstance(model, SigmoidBranchClassifier):
            raise TypeError(f"the sigmoid branch's logit needs a SigmoidBranchClassifier, got a {type(model).__name__}")


@dataclass(frozen=True)
class ContrastLogit(HeadLogit):
    """The contrast of class k against the others: z_k - mean_{j != k} z_j, maps E_k - mean_{j != k} E_j."""

    name: ClassVar[str] = "contrast"
    title: ClassVar[str] = "contrast"
    contrast: ClassVar[bool] = True


TARGETS: dict[str, HeadLogit] = {target.name: target for target in (HeadLogit(), BranchLogit(), ContrastLogit())}


def target_named(name: str | HeadLogit) -> HeadLogit:
    """The target called ``name`` (a key of ``TARGETS``); a target passes through."""
    if isinstance(name, HeadLogit):
        return name
    if name not in TARGETS:
        raise ValueError(f"unknown explanation target {name!r}; choose one of {sorted(TARGETS)}")
    return TARGETS[name]
