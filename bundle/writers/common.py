"""What the DICOM writers share: model identity, derived UIDs, orientation and body part of the source."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.uid import generate_uid

RESEARCH_NOTE = "RESEARCH USE ONLY"
# Body Part Examined defined terms (PS3.16 Annex L) of structures that have no laterality:
# Laterality must then be absent; for any other (or no) body part it is sent, empty when unknown.
UNPAIRED_BODY_PARTS = frozenset({
    "ABDOMEN", "ABDOMENPELVIS", "AORTA", "BLADDER", "BRAIN", "CHEST", "CHESTABDOMEN", "CHESTABDPELVIS",
    "COCCYX", "COLON", "CSPINE", "ESOPHAGUS", "HEAD", "HEADNECK", "HEART", "LIVER", "LSPINE", "NECK",
    "PANCREAS", "PELVIS", "PROSTATE", "SACRUM", "SKULL", "SPINE", "SPLEEN", "STOMACH", "THYROID",
    "TRACHEA", "TSPINE", "UTERUS", "WHOLEBODY",
})


@dataclass(frozen=True)
class ModelIdentity:
    """The model that produced an evidence map, as written into derived objects."""

    name: str  # e.g. "resnet18-softcam"
    version: str  # bundle version from metadata.json
    weights_digest: str = ""  # a short hash of the checkpoint, so retrained weights get new UIDs
    manufacturer: str = "SoftCAM bundle"
    evidence_map: str = "raw"  # which map is written (bundle.networks.classifier.class_evidence)

    @property
    def description(self) -> str:
        return f"{self.name} {self.version}" + (f" ({self.weights_digest})" if self.weights_digest else "")

    @property
    def map_title(self) -> str:
        """What the written map is, in words, for the derivation descriptions."""
        return "class evidence map" if self.evidence_map == "raw" else \
            "contrast evidence map (the class's evidence minus the mean of the other classes')"


def derived_uid(source_uid: str, model: ModelIdentity, what: str) -> str:
    """A UID that depends only on the source UID, the model identity and what is derived.

    Writing the same output for the same input twice gives the same UID, so a PACS that
    receives it again does not store a duplicate.
    """
    # the raw map keeps the UIDs it had before the contrast map existed; another map gets UIDs of its own
    kind = [] if model.evidence_map == "raw" else [model.evidence_map]
    return generate_uid(entropy_srcs=[source_uid, model.name, model.version, model.weights_digest, what, *kind])


def patient_orientation(ds: pydicom.Dataset) -> tuple[str, str] | None:
    """(row direction, column direction) letters of a source image, or None when unknown.

    From ImageOrientationPatient (dominant LPS axis of each direction cosine) when present,
    else the source's own PatientOrientation.
    """
    if "ImageOrientationPatient" in ds:
        cosines = np.asarray(ds.ImageOrientationPatient, dtype=float).reshape(2, 3)
        letters = (("L", "R"), ("P", "A"), ("H", "F"))
        return tuple(letters[int(np.argmax(np.abs(c)))][0 if c[np.argmax(np.abs(c))] > 0 else 1] for c in cosines)
    if len(ds.get("PatientOrientation", [])) == 2:
        return tuple(str(v) for v in ds.PatientOrientation)
    return None


def copy_body_part(source: pydicom.Dataset, derived: pydicom.Dataset) -> None:
    """Carry BodyPartExamined and laterality over from the source to a derived object."""
    if source.get("BodyPartExamined"):
        derived.BodyPartExamined = source.BodyPartExamined
    laterality = source.get("Laterality") or source.get("ImageLaterality")
    if laterality:
        derived.Laterality = laterality
    elif str(source.get("BodyPartExamined", "")).upper() not in UNPAIRED_BODY_PARTS:
        derived.Laterality = None  # Type 2C: the part may be paired, so present and empty (unknown)
