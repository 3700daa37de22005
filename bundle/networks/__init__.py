from bundle.networks.backbones import BACKBONES, BackboneFeatures
from bundle.networks.classifier import HEADS, ClassEvidenceHead, ImageClassifier, LinearHead, classifier
from bundle.networks.sigmoid_branch import BranchInferer, SigmoidBranchClassifier, sigmoid_branch_classifier

__all__ = [
    "BACKBONES",
    "HEADS",
    "BackboneFeatures",
    "BranchInferer",
    "ClassEvidenceHead",
    "ImageClassifier",
    "LinearHead",
    "SigmoidBranchClassifier",
    "classifier",
    "sigmoid_branch_classifier",
]
