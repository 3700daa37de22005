"""A synthetic dataset with known lesion ground truth, standing in for a real one offline.

2D: chest-radiograph-like images written as CR DICOM files (12-16 bit, some MONOCHROME1, some
with a rescale intercept). 3D: CT-like volumes in HU written as NIfTI with a real affine.

The label is the presence (2 classes) or type (3 classes: solid nodule / ring-shaped cavitating
lesion) of one small lesion in the lung field. Every image also has distractors a model must learn
to ignore: ribs or tubular vessels, tiny bright calcifications, large faint blobs, smooth
background variation, noise, and a random global gain and offset, so the label cannot be read off
global intensity. Each positive image gets a binary lesion mask (NIfTI) as localisation ground truth.

Two options set the task's scale and difficulty: ``lesion_size`` multiplies the lesion radius
(2D: 2.2-3.5 % of the image rows; 3D: 2.5-4 voxels) and ``lesion_contrast`` the lesion's intensity
(2D: 0.12-0.2 of the attenuation range; 3D: 700-900 HU), while the distractors stay as they are: a
lower contrast buries the lesion among vessels, blobs and noise of similar intensity. At 1.0
(the defaults) the output is the same as without the options.

Everything is derived from ``(seed, index)``: the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
LESION_TYPES = {0: "none", 1: "solid nodule", 2: "cavitating (ring) lesion"}


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    return np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")


def _blob(shape, centre, radii) -> np.ndarray:
    """Smooth-edged ellipsoid in [0, 1] with the given centre and per-axis radii (pixels)."""
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(_grid(shape), centre, radii))
    return (1.0 / (1.0 + np.exp(np.minimum((np.sqrt(r2) - 1.0) * 8.0, 60.0)))).astype(np.float32)


def _lesion(rng: np.random.Generator, shape, centre, radius: float, lesion_type: int) -> tuple[np.ndarray, np.ndarray]:
    """Lesion profile in [0, 1] and its binary mask; type 1 a solid nodule, type 2 a ring."""
    radii = [radius * rng.uniform(0.85, 1.15) for _ in shape]
    outer = _blob(shape, centre, radii)
    if lesion_type == 2:
        profile = np.clip(outer - _blob(shape, centre, [r * 0.55 for r in radii]), 0, 1)
    else:
        profile = outer
    return profile, (profile > 0.5).astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (np.abs(field).max() + 1e-6)


def _random_point_in(rng: np.random.Generator, region: np.ndarray, margin: int) -> np.ndarray:
    inner = ndimage.binary_erosion(region, iterations=margin) if margin else region
    candidates = np.argwhere(inner if inner.any() else region)
    return candidates[rng.integers(len(candidates))].astype(np.float32)


def radiograph(rng: np.random.Generator, shape: tuple[int, int], lesion_type: int, lesion_size: float = 1.0,
               lesion_contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A chest-radiograph-like attenuation image (H, W) in [0, 1] and its lesion mask (H, W) uint8."""
    h, w = shape
    yy, xx = _grid(shape)
    body = _blob(shape, (h * 0.52, w * 0.5), (h * 0.55, w * 0.46))
    lungs = [_blob(shape, (h * rng.uniform(0.42, 0.5), w * (0.5 + s * rng.uniform(0.2, 0.24))),
                   (h * rng.uniform(0.28, 0.34), w * rng.uniform(0.14, 0.18))) for s in (-1, 1)]
    lung = np.clip(lungs[0] + lungs[1], 0, 1)
    img = 0.25 + 0.45 * body - 0.3 * lung
    # ribs: bright curved bands crossing the lung fields
    phase, period = rng.uniform(0, 2 * np.pi), h * rng.uniform(0.09, 0.12)
    bend = 0.002 * h * rng.uniform(0.8, 1.2) * ((xx - w / 2) / (w / 2)) ** 2 * h
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (yy + bend) / period + phase)
    img += rng.uniform(0.05, 0.09) * ribs**6 * body
    # vessels: elongated faint blobs in the lungs
    for _ in range(rng.integers(4, 9)):
        c = _random_point_in(rng, lung > 0.5, 2)
        length, width = rng.uniform(10, 30), rng.uniform(1.5, 3.0)
        angle = rng.uniform(0, np.pi)
        u = (yy - c[0]) * np.cos(angle) + (xx - c[1]) * np.sin(angle)
        v = -(yy - c[0]) * np.sin(angle) + (xx - c[1]) * np.cos(angle)
        img += rng.uniform(0.06, 0.14) * np.exp(-(u / length) ** 2 - (v / width) ** 2)
    # tiny bright calcifications and large faint blobs
    for _ in range(rng.integers(1, 5)):
        img += rng.uniform(0.15, 0.3) * _blob(shape, _random_point_in(rng, body > 0.5, 4), [rng.uniform(1.0, 2.0)] * 2)
    for _ in range(rng.integers(1, 4)):
        img += rng.uniform(0.04, 0.08) * _blob(shape, _random_point_in(rng, body > 0.5, 4), [rng.uniform(18, 30)] * 2)
    img += 0.05 * _smooth_noise(rng, shape, sigma=h / 12)
    mask = np.zeros(shape, np.uint8)
    if lesion_type:
        # the margin keeps a larger lesion as deep inside the lung field as the default one
        centre = _random_point_in(rng, lung > 0.6, int(h * 0.04 * lesion_size))
        profile, mask = _lesion(rng, shape, centre, h * rng.uniform(0.022, 0.035) * lesion_size, lesion_type)
        img += rng.uniform(0.12, 0.2) * lesion_contrast * profile
    img = ndimage.gaussian_filter(img, 0.7)
    img = img * rng.uniform(0.8, 1.2) + rng.uniform(-0.08, 0.08)
    img += rng.normal(0, rng.uniform(0.008, 0.02), shape)
    return np.clip(img, 0, 1).astype(np.float32), mask


def ct_volume(rng: np.random.Generator, shape: tuple[int, int, int], lesion_type: int, lesion_size: float = 1.0,
              lesion_contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A chest-CT-like volume (X, Y, Z) in Hounsfield units (int16) and its lesion mask (uint8)."""
    x, y, z = shape
    gx, gy, gz = _grid(shape)
    body = _blob(shape, (x / 2, y / 2, z / 2), (x * 0.46, y * 0.38, z * 2.0))
    lung = np.clip(sum(_blob(shape, (x * (0.5 + s * 0.2), y * 0.48, z / 2), (x * 0.16, y * 0.26, z * 0.6))
                       for s in (-1, 1)), 0, 1)
    spine = _blob(shape, (x / 2, y * 0.78, z / 2), (x * 0.06, y * 0.06, z * 2.0))
    hu = -1000 + 1040 * body - 890 * lung + 500 * spine
    # vessels: tubes of soft-tissue density branching through the lungs
    for _ in range(rng.integers(5, 10)):
        c = _random_point_in(rng, lung > 0.5, 1)
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d)
        along = (gx - c[0]) * d[0] + (gy - c[1]) * d[1] + (gz - c[2]) * d[2]
        across2 = (gx - c[0]) ** 2 + (gy - c[1]) ** 2 + (gz - c[2]) ** 2 - along**2
        tube = np.exp(-across2 / rng.uniform(0.8, 2.0) ** 2 - (along / rng.uniform(8, 16)) ** 2)
        hu += rng.uniform(600, 850) * tube * lung
    for _ in range(rng.integers(1, 4)):  # tiny calcified granulomas
        hu += rng.uniform(400, 800) * _blob(shape, _random_point_in(rng, lung > 0.5, 1), [1.0] * 3)
    hu += 60 * _smooth_noise(rng, shape, sigma=x / 8)
    mask = np.zeros(shape, np.uint8)
    if lesion_type:
        centre = _random_point_in(rng, lung > 0.6, round(3 * lesion_size))
        profile, mask = _lesion(rng, shape, centre, rng.uniform(2.5, 4.0) * lesion_size, lesion_type)
        hu += rng.uniform(700, 900) * lesion_contrast * profile * lung
    hu = ndimage.gaussian_filter(hu, 0.6) + rng.normal(0, rng.uniform(10, 25), shape)
    return np.clip(hu, -1024, 3071).astype(np.int16), mask


@dataclass(frozen=True)
class CaseIdentity:
    """The fake patient, study, series and instance of one synthetic image."""

    index: int
    seed: int

    def uid(self, what: str) -> str:
        return generate_uid(entropy_srcs=[f"softcam-synthetic/{self.seed}/{self.index}/{what}"])

    @property
    def patient_id(self) -> str:
        return f"SYN{self.seed:03d}{self.index:05d}"


def _dicom_case(identity: CaseIdentity, sop_class: str, modality: str, study: str, instance: int = 1) -> pydicom.Dataset:
    """The patient, study, series, equipment and SOP attributes shared by every synthetic DICOM image."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = identity.uid(f"instance/{instance}")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["softcam-bundle"])
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{8 + identity.index % 10:02d}0000"
    ds.AccessionNumber = f"ACC{identity.index:07d}"
    ds.Modality = modality
    ds.Manufacturer = "SoftCAM synthetic data"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study
    ds.PatientName = f"SYNTHETIC^CASE{identity.index:05d}"
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = f"19{50 + identity.index % 45:02d}0{1 + identity.index % 9}15"
    ds.PatientSex = "FM"[identity.index % 2]
    ds.StudyInstanceUID = identity.uid("study")
    ds.SeriesInstanceUID = identity.uid("series")
    ds.StudyID = f"{identity.index}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if modality == "CT" else ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1.0
    return ds


def write_cr_dicom(path: Path, attenuation: np.ndarray, identity: CaseIdentity, rng: np.random.Generator) -> None:
    """Write an attenuation image (H, W) in [0, 1] as a CR DICOM file with its own UIDs."""
    bits = int(rng.choice([12, 14, 16]))
    monochrome1 = rng.random() < 0.3
    intercept = -1024.0 if rng.random() < 0.25 else 0.0
    spacing = round(float(rng.uniform(1.2, 1.6)), 3)
    top = 2**bits - 1
    stored = np.round(attenuation * top).astype(np.uint16)
    if monochrome1:
        stored = (top - stored).astype(np.uint16)
    lo, hi = np.percentile(stored, [1, 99]) + intercept

    ds = _dicom_case(identity, CR_IMAGE_STORAGE, "CR", "Synthetic chest radiograph")
    ds.SeriesDescription = "PA"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = attenuation.shape
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.RescaleIntercept = intercept
    ds.RescaleType = "US"
    ds.WindowCenter = round(float((lo + hi) / 2), 1)
    ds.WindowWidth = round(float(max(hi - lo, 1.0)), 1)
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_ct_series(folder: Path, hu: np.ndarray, affine: np.ndarray, identity: CaseIdentity) -> None:
    """Write a volume (X, Y, Z) in HU with a RAS ``affine`` (axis-aligned) as a CT DICOM series, one
    file per slice, such that MONAI's PydicomReader gives back the same array and affine."""
    folder.mkdir(parents=True, exist_ok=True)
    spacing = np.abs(np.diag(affine)[:3])
    origin_lps = affine[:3, 3] * np.array([-1.0, -1.0, 1.0])  # DICOM patient space is LPS, NIfTI's RAS
    for k in range(hu.shape[2]):
        ds = _dicom_case(identity, CT_IMAGE_STORAGE, "CT", "Synthetic chest CT", instance=k + 1)
        ds.SeriesDescription = "Axial"
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = identity.uid("frame-of-reference")
        ds.PositionReferenceIndicator = ""
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
        # the reader's first array axis runs along the row direction (columns), the second down the rows
        ds.ImageOrientationPatient = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin_lps + np.array([0.0, 0.0, k * spacing[2]])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # (between rows, between columns)
        ds.SliceThickness = float(spacing[2])
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.RescaleIntercept = -1024.0
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = -600.0, 1500.0
        ds.PixelData = (hu[:, :, k].T.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16).tobytes()
        ds.save_as(folder / f"slice_{k + 1:04d}.dcm", enforce_file_format=True)


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def radiograph_mask_affine(spacing: float) -> np.ndarray:
    """The affine MONAI's PydicomReader gives a projection image without position: LPS->RAS flipped."""
    return np.diag([-spacing, -spacing, 1.0, 1.0])


def ct_affine(rng: np.random.Generator, shape) -> np.ndarray:
    """An axis-aligned RAS affine with anisotropic spacing and an off-centre origin, rounded to
    what a DICOM decimal string holds so that the NIfTI and DICOM copies agree exactly."""
    spacing = np.round([rng.uniform(1.4, 1.8), rng.uniform(1.4, 1.8), rng.uniform(2.0, 3.0)], 3)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = np.round(-spacing * (np.array(shape) - 1) / 2 + rng.uniform(-20, 20, 3), 2)
    return affine


def _labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    return labels


def make_dataset(out: Path, dims: int = 2, n: int = 800, seed: int = 0, num_classes: int = 2,
                 size: int | None = None, dicom_series: bool = False, lesion_size: float = 1.0,
                 lesion_contrast: float = 1.0) -> dict:
    """Write ``n`` cases to ``out`` and a Decathlon-style ``datalist.json`` (70/15/15 split, stratified).

    Returns the datalist. 2D cases are ``images/case_XXXXX.dcm``, 3D ``images/case_XXXXX.nii.gz``
    (with ``dicom_series``, also a CT series folder ``series/case_XXXXX/``, which the datalist then
    names); masks ``masks/case_XXXXX.nii.gz`` for positive cases. ``lesion_size`` and
    ``lesion_contrast`` (> 0) scale the lesions' radius and intensity (see the module docstring).
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if not (lesion_size > 0 and lesion_contrast > 0):
        raise ValueError(f"lesion_size and lesion_contrast must be > 0, got {lesion_size}, {lesion_contrast}")
    lesions = {"lesion_size": lesion_size, "lesion_contrast": lesion_contrast}
    if num_classes not in (2, 3):
        raise ValueError(f"num_classes must be 2 (presence) or 3 (type), got {num_classes}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    labels = _labels(n, num_classes, np.random.default_rng([seed, 1 << 20]))
    size = size or (256 if dims == 2 else 64)
    items = []
    for index, label in enumerate(labels):
        rng = np.random.default_rng([seed, index])
        name = f"case_{index:05d}"
        item = {"label": int(label)}
        if dims == 2:
            shape = (size, int(size * rng.choice([0.8125, 0.9375, 1.0])))
            image, mask = radiograph(rng, shape, int(label), **lesions)
            image_path = out / "images" / f"{name}.dcm"
            write_cr_dicom(image_path, image, CaseIdentity(index, seed), rng)
            spacing = float(pydicom.dcmread(image_path, stop_before_pixels=True).PixelSpacing[0])
            mask_affine = radiograph_mask_affine(spacing)
            mask = mask.T  # MONAI reads DICOM pixel arrays column-major (swap_ij); NIfTI as stored
        else:
            shape = (size, size, int(size * 0.75))
            volume, mask = ct_volume(rng, shape, int(label), **lesions)
            mask_affine = ct_affine(rng, shape)
            image_path = out / "images" / f"{name}.nii.gz"
            _write_nifti(image_path, volume, mask_affine)
            if dicom_series:
                image_path = out / "series" / name
                write_ct_series(image_path, volume, mask_affine, CaseIdentity(index, seed))
        item["image"] = str(image_path.relative_to(out))
        if label:
            mask_path = out / "masks" / f"{name}.nii.gz"
            _write_nifti(mask_path, mask, mask_affine)
            item["mask"] = str(mask_path.relative_to(out))
        items.append(item)

    datalist = {"training": [], "validation": [], "test": []}
    for cls in range(num_classes):
        members = [it for it in items if it["label"] == cls]
        n_val = n_test = round(0.15 * len(members))
        datalist["test"] += members[:n_test]
        datalist["validation"] += members[n_test:n_test + n_val]
        datalist["training"] += members[n_test + n_val:]
    for split in datalist.values():
        split.sort(key=lambda it: it["image"])
    datalist.update(
        description=f"SoftCAM synthetic {dims}D dataset, seed {seed}: lesion "
                    + ("presence" if num_classes == 2 else "type") + " classification"
                    + "".join(f", {k.replace('_', ' ')} x{v:g}" for k, v in lesions.items() if v != 1.0),
        labels={str(k): v for k, v in LESION_TYPES.items() if k < num_classes},
        numTraining=len(datalist["training"]),
    )
    (out / "datalist.json").write_text(json.dumps(datalist, indent=1))
    return datalist
