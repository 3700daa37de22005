from bundle.networks.backbones import BACKBONES, BackboneFeatures
from bundle.networks.classifier import HEADS, ClassEvidenceHead, ImageClassifier, LinearHead, classifier

__all__ = ["BACKBONES", "HEADS", "BackboneFeatures", "ClassEvidenceHead", "ImageClassifier", "LinearHead", "classifier"]
