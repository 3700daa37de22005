"""What a derived object copies from its source conforms to the standard, or is left out.

Sources in the wild carry values that do not conform to their VR ('11:20:00' in a TM, a 70-character
person name, a UID with letters), a PixelSpacing of 0\\0, over-long SH values. highdicom's
constructors refuse some of these and copy others into objects that then fail validation. So the
writers never see the source header itself but ``conformant(ds)``: a copy in which every value is
checked with pydicom's own validators (``pydicom.valuerep.VALIDATORS``, the VR rules of PS3.5
6.2) and is kept, repaired, replaced or dropped:

- repaired: a TM or DA in the old ACR-NEMA form with separators ('11:20:00', '2020-01-02' or
  '2020.01.02') is written without them; a DS longer than 16 characters is re-formatted to fit; an
  IS holding an integral decimal ('3.0') becomes that integer;
- replaced: an invalid UID becomes a UID derived from it (the same for every output of every run),
  because UIDs are Type 1 where outputs use them. For the Study Instance UID this means the outputs
  go into a new study of the same patient, not the source's: an exact copy would not pass validation
  and many PACS reject or rewrite it. The run reports it for the input (the ``notes`` column of
  predictions.csv) and in the log, so a PACS administrator can file the results by hand;
- dropped: any other non-conformant value, and a PixelSpacing or ImagerPixelSpacing with a zero,
  negative or non-finite value (the outputs then state no spacing).

Each change is reported by attribute keyword and VR, never by value.
"""

from __future__ import annotations

import math
import re

import pydicom
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid
from pydicom.valuerep import VALIDATORS, format_number_as_ds

SPACINGS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")
UNCHECKED_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ"}  # binary, or walked into
# How to turn stored values into displayed ones (palette colour tables, modality and VOI lookup tables):
# the loader has applied them, the outputs never copy them, and pydicom keeps LUT descriptors in a form
# that cannot be pickled from a DataLoader worker to the writers
DECODING_TAGS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00281201, 0x00281202, 0x00281203, 0x00281221,
                           0x00281222, 0x00281223, 0x00283000, 0x00283002, 0x00283010})
_ACR_NEMA_SEPARATORS = {"TM": re.compile(r"[:]"), "DA": re.compile(r"[-./]")}


def _values(element: DataElement) -> list:
    value = element.value
    if isinstance(value, (list, MultiValue)):
        return list(value)
    return [] if value is None or value == "" else [value]


def _conforms(vr: str, values: list) -> bool:
    validator = VALIDATORS.get(vr)
    if validator is None:
        return True
    for value in values:
        text = str(value) if vr in ("DS", "IS", "PN") else value
        if not validator(vr, text)[0]:
            return False
    return True


def _repaired(vr: str, values: list) -> list | None:
    """The values rewritten to conform (see the module's doc), or None when there is no safe repair."""
    try:
        if vr in _ACR_NEMA_SEPARATORS:
            fixed = [_ACR_NEMA_SEPARATORS[vr].sub("", str(v)) for v in values]
        elif vr == "DS":
            fixed = [format_number_as_ds(float(str(v))) for v in values]
        elif vr == "IS":
            numbers = [float(str(v)) for v in values]
            fixed = [str(int(n)) for n in numbers if n.is_integer()]
            fixed = fixed if len(fixed) == len(numbers) else None
        else:
            return None
    except (TypeError, ValueError, OverflowError):
        return None
    return fixed if fixed is not None and _conforms(vr, fixed) else None


def _bad_spacing(values: list) -> bool:
    try:
        return not values or not all(math.isfinite(float(v)) and float(v) > 0 for v in values)
    except (TypeError, ValueError):
        return True


def _check(ds: pydicom.Dataset, notes: list[str], where: str = "") -> None:
    for tag in list(ds.keys()):
        element = ds[tag]
        keyword = element.keyword or str(element.tag)
        name = f"{where}{keyword}"
        if element.VR == "SQ":
            for item in element.value:
                _check(item, notes, f"{name} > ")
            continue
        if element.VR in UNCHECKED_VRS or element.tag.group in (0x0002, 0x7FE0):
            continue
        values = _values(element)
        if keyword in SPACINGS and element.value not in (None, ""):
            if _bad_spacing(values):
                del ds[element.tag]
                notes.append(f"{name} ({element.VR}) dropped: zero, negative or not a number")
            continue
        if _conforms(element.VR, values):
            continue
        if element.VR == "UI":
            replaced = [generate_uid(entropy_srcs=["non-conformant UID", str(v)]) for v in values]
            element.value = replaced if len(replaced) > 1 else replaced[0]
            consequence = "; the outputs go into a new study" if keyword == "StudyInstanceUID" and not where else ""
            notes.append(f"{name} (UI) replaced by a derived UID: not a valid UID{consequence}")
            continue
        fixed = _repaired(element.VR, values)
        if fixed is not None:
            element.value = fixed if len(fixed) > 1 else fixed[0]
            notes.append(f"{name} ({element.VR}) repaired: did not conform to its VR")
        else:
            del ds[element.tag]
            notes.append(f"{name} ({element.VR}) dropped: does not conform to its VR")


def _header_copy(ds: pydicom.Dataset, skip: frozenset = frozenset()) -> pydicom.Dataset:
    """``ds`` without pixel data, ``DECODING_TAGS`` and the top-level tags ``skip``, with new elements and
    sequence items (values are immutable or copied)."""
    header = pydicom.Dataset()
    for tag in ds.keys():
        if tag.group == 0x7FE0 or tag in DECODING_TAGS or tag in skip:  # pixel data: decoded by the loader
            continue
        element = ds[tag]
        if element.VR == "SQ":
            value = [_header_copy(item) for item in element.value]
        else:
            value = list(element.value) if isinstance(element.value, MultiValue) else element.value
        # the values are checked below, once: no validation (and warning) as the copy is made
        header.add(DataElement(tag, element.VR, value, validation_mode=config.IGNORE))
    return header


def conformant(ds: pydicom.Dataset, skip=frozenset()) -> tuple[pydicom.Dataset, list[str]]:
    """A copy of the header ``ds`` without its pixel data (and lookup tables, and the top-level tags
    ``skip``), whose values all conform to their VRs, and a note per change (keyword, VR and what was
    done; never a value). ``ds`` is left as it is, and pixel data it left on disk is not read."""
    header = _header_copy(ds, frozenset(skip))
    header.file_meta = pydicom.dataset.FileMetaDataset(getattr(ds, "file_meta", pydicom.Dataset()))
    notes: list[str] = []
    _check(header, notes)
    return header, notes
