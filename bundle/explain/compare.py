"""Compare every explanation method on one test split: one table shaped like the papers' tables.

Rows ("contenders") come from the models compared and the explainer registry
(``bundle.explain.methods.EXPLAINERS``): a black box with every post-hoc method; a black box
with a dual-branch sigmoid head (Oh & Noh) under every CAM-family method; each SoftCAM model's
raw evidence map and its contrast map (E_k minus the mean of the other classes' maps); a SoftCAM
with a sigmoid evidence branch under its branch's map. Columns: classification metrics of the
row's classifier, then explanation metrics of the row's maps. Beside them, for every map
resolution in the table, the localisation scores of the ideal map at that resolution (the mask
pooled to the grid and upsampled as the maps are) and of a random map: ceiling and chance. A
model whose checkpoint is missing is left out with a log line, so a user compares what they trained.

Which class is explained:
- Average Drop / Increase in Confidence (every test image): the class the classifier predicts;
- deletion and insertion (SoftCAM reference): lesion images that every compared model classifies
  correctly, the lesion's class, the first patches one at a time, against the same model's curve
  in a seeded random patch order;
- localisation (annotated images): the lesion's class, as weakly supervised localisation
  benchmarks do ("GT-known");
- sign consistency (SoftCAM reference): the disease class's map on every image, positive evidence
  counted on diseased images and negative on healthy ones (``metrics.disease_classes``).

Writes ``comparison.csv`` / ``.md``, ``box_accuracy_curves.csv``, ``box_accuracy.png``,
``deletion_curves.png`` and ``method_grid.png`` to ``output_dir`` and, with a tracking object
(``bundle.tracking.ComparisonTracking``), logs them to an MLflow run with one child run per row.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.transforms import Compose

from bundle.checkpoints import load_checkpoint, network_for_checkpoint
from bundle.explain import boxes, faithfulness, localisation, report
from bundle.explain.metrics import accuracy, balanced_accuracy, cohen_kappa, disease_classes, evidence_sign_consistency, roc_auc
from bundle.explain.methods import EXPLAINERS, make_explainer
from bundle.explain.targets import target_named

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Contender:
    """One row: ``method`` explaining ``target`` ("logit", "branch", "contrast") of the classifier
    ``model`` (a key of the comparison's models)."""

    label: str
    model: str
    method: str
    target: str = "logit"


def default_contenders(models: dict[str, dict]) -> list[Contender]:
    """The rows of both papers' tables for ``models`` (name -> {"head", "branch"}), from the registry."""
    rows = []
    for name, spec in models.items():
        branch, softcam = bool(spec.get("branch")), spec["head"] == "softcam"
        if softcam:
            rows += [Contender(name, name, "softcam", "branch")] if branch else [
                Contender(name, name, "softcam"), Contender(f"{name} (contrast)", name, "softcam", "contrast")]
            continue
        for method in EXPLAINERS.values():
            if method.family != "self-explaining" and (not branch or method.family == "cam"):
                rows.append(Contender(f"{name} + {method.title}", name, method.name, "branch" if branch else "logit"))
    return rows


@dataclass
class TestSet:
    """Preprocessed test images (N, Ch, *S), labels (N,) and lesion masks (N, *S) (empty: healthy)."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor


def load_test_set(items: list[dict], preprocessing: Compose, prepare_mask: Compose, limit: int | None = None) -> TestSet:
    """Run the bundle's preprocessing over datalist ``items``; masks go through ``prepare_mask``, which
    must repeat the image's spatial steps, and are empty where an item has none."""
    items = items[:limit] if limit else items
    images, labels, masks = [], [], []
    for item in items:
        data = preprocessing(dict(item))
        image = torch.as_tensor(data["image"]).float()
        images.append(image)
        labels.append(int(torch.as_tensor(item["label"]).reshape(())))
        if item.get("mask"):
            mask = torch.as_tensor(prepare_mask({"mask": item["mask"]})["mask"])[0] > 0.5
            if mask.shape != image.shape[1:]:
                raise ValueError(f"mask {mask.shape} and image {tuple(image.shape[1:])} differ after preprocessing")
        else:
            mask = torch.zeros(image.shape[1:], dtype=torch.bool)
        masks.append(mask)
    return TestSet(torch.stack(images), torch.tensor(labels), torch.stack(masks))


def _nanmean(values: torch.Tensor) -> float:
    return float(torch.nanmean(values.double())) if values.numel() else math.nan


@dataclass(frozen=True)
class LocalisationOptions:
    """How the localisation columns are computed (see ``ExplanationComparison``)."""

    top_k: int = 3
    top_k_threshold: float = 0.0
    patch: int = 16
    pointing_tolerance: float = 0.0
    box_thresholds: int = 100
    loc_threshold: float = 0.2


def localisation_scores(maps: torch.Tensor, masks: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor,
                        options: LocalisationOptions) -> tuple[dict[str, float], tuple | None]:
    """The localisation columns of maps (N, *S) of the lesion class on annotated images, and the
    BoxAcc-vs-tau curves (taus, BoxAcc (deltas, T), largest-box BoxAcc (deltas, T), deltas)."""
    if not len(maps):
        return {key: math.nan for key in report.LOCALISATION}, None
    box = boxes.max_box_accuracy(maps, masks, options.box_thresholds)
    columns = {
        "activation_precision": _nanmean(localisation.activation_precision(maps, masks)),
        "activation_sensitivity": _nanmean(localisation.activation_sensitivity(maps, masks)),
        "top_k_precision": float(localisation.top_k_localisation_precision(
            maps, masks, options.top_k, options.patch, options.top_k_threshold).precision),
        "pointing_game": _nanmean(localisation.pointing_game(maps, masks, options.pointing_tolerance)),
        "pxap": float(localisation.pxap_dataset(maps, masks)),
        "max_box_acc_v2": float(box.max_box_acc),
        "gt_loc": _nanmean(boxes.gt_localisation(maps, masks, options.loc_threshold)),
        "top1_loc": _nanmean(boxes.top1_localisation(maps, masks, predicted, labels, options.loc_threshold)),
    }
    curves = (box.thresholds.cpu(), box.box_accuracy.cpu(), box.largest_box_accuracy.cpu(), boxes.IOU_THRESHOLDS)
    return columns, curves


def sign_columns(maps: torch.Tensor, diseased: torch.Tensor) -> dict[str, float]:
    """Evidence sign consistency of the disease class's ``maps``: over all images, lesion images, healthy ones."""
    sign = evidence_sign_consistency(maps, diseased)
    return {"sign_consistency": _nanmean(sign), "sign_positive_lesion": _nanmean(sign[diseased]),
            "sign_negative_healthy": _nanmean(sign[~diseased])}


def classification(logits: torch.Tensor, labels: torch.Tensor, ordinal: bool = False) -> dict[str, float]:
    """Accuracy, balanced accuracy, ROC AUC and Cohen's kappa (quadratic for ordinal grades) of logits (N, C)."""
    predicted, classes = logits.argmax(1), logits.shape[1]
    return {"accuracy": float(accuracy(predicted, labels)),
            "balanced_accuracy": float(balanced_accuracy(predicted, labels, classes)),
            "auc": float(roc_auc(logits.softmax(1), labels)),
            "kappa": float(cohen_kappa(predicted, labels, classes, "quadratic" if ordinal else None))}


def reference_rows(test, grid_shape: tuple[int, ...], options: LocalisationOptions, seed: int = 0,
                   device: str | torch.device = "cpu") -> list[tuple[dict, tuple | None]]:
    """Ceiling and chance of the localisation columns at a map resolution, on the annotated images
    of ``test``: the ideal map (the mask pooled to the grid, upsampled as the maps are) and a seeded
    random map. Top-1 Loc takes the class as right, so it equals GT-Loc there."""
    annotated = test.masks.flatten(1).any(1)
    masks, labels = test.masks[annotated].to(device), test.labels[annotated]
    size = "x".join(map(str, grid_shape))
    maps = {"ideal": localisation.ideal_maps(masks, grid_shape),
            "random": localisation.random_maps(tuple(masks.shape), grid_shape, seed, device)}
    rows = []
    for kind, reference in maps.items():
        columns, box_curve = localisation_scores(reference, masks, labels, labels, options)
        rows.append(({"method": f"{kind} map at {size}", "kind": kind, **columns, "raw_map_shape": size}, box_curve))
    return rows


@torch.no_grad()
def batched_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """The model's logits (N, C) on the CPU, ``batch_size`` images at a time."""
    return torch.cat([model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)])


def batched_maps(explainer, images: torch.Tensor, targets: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, tuple]:
    """Upsampled maps (N, *S) on the CPU and the raw maps' spatial shape, batch by batch."""
    maps, raw_shape = [], None
    for i in range(0, len(images), batch_size):
        explanation = explainer(images[i : i + batch_size], targets[i : i + batch_size])
        maps.append(explanation.upsampled[:, 0].cpu())
        raw_shape = tuple(explanation.raw.shape[2:])
    return torch.cat(maps), raw_shape


def describe(models: dict[str, dict], contenders) -> dict[str, dict]:
    """Each contender's label -> what its row is: the model's name, head and checkpoint (``models``' entry),
    the explainer's title as in the papers' tables, and the explained target."""
    return {c.label: {"model": c.model, "head": models[c.model]["head"], "explainer": EXPLAINERS[c.method].title,
                      "target": c.target, "checkpoint": str(models[c.model]["checkpoint"])} for c in contenders}


def grid_indices(annotated: torch.Tensor, count: int) -> torch.Tensor:
    """The method grid's images: annotated ones first (the lesion to look for), then healthy ones."""
    order = torch.cat([torch.nonzero(annotated).flatten(), torch.nonzero(~annotated).flatten()])
    return order[:count]


@dataclass
class PerturbationTest:
    """Deletion and insertion as the SoftCAM reference runs them on ``test``: patches of ``patch`` voxels,
    the first ``fraction`` of them (the reference's 14 of ~256, about 6 %) one at a time, replaced by the
    test images' mean intensity (the images are in [0, 1], not centred)."""

    test: TestSet
    patch: int
    fraction: float
    batch_size: int
    device: torch.device

    def total_patches(self) -> int:
        return faithfulness.count_patches(tuple(self.test.images.shape[2:]), self.patch)

    def curves(self, model, maps: torch.Tensor, chosen: torch.Tensor) -> dict[str, faithfulness.PerturbationCurve]:
        """Both curves of ``maps`` (N, *S) on the ``chosen`` lesion images, for the lesion class."""
        options = {"patch_size": self.patch, "baseline": float(self.test.images.mean()), "chunk_size": self.batch_size,
                   "num_patches": max(1, round(self.fraction * self.total_patches()))}
        images, targets = self.test.images[chosen].to(self.device), self.test.labels[chosen].to(self.device)
        maps = maps.to(self.device)

        def classify(x: torch.Tensor) -> torch.Tensor:
            return model(x).float()

        return {"deletion": faithfulness.deletion_curve(classify, images, maps, targets, **options),
                "insertion": faithfulness.insertion_curve(classify, images, maps, targets, **options)}

    def columns(self, model, maps: torch.Tensor, chosen: torch.Tensor, baseline: dict | None) -> tuple[dict, tuple]:
        """A row's deletion and insertion columns (areas, and gains over the random patch order's ``baseline``
        curves) from ``maps`` (N, *S) on the ``chosen`` images, and its mean deletion curve; NaN columns and an
        empty curve where there is no baseline (no lesion image)."""
        if baseline is None:
            columns = dict.fromkeys(("deletion_audc", "deletion_gain", "insertion_auc", "insertion_gain"), math.nan)
            return columns, (torch.zeros(0), torch.zeros(0))
        ordered = self.curves(model, maps, chosen)
        deletion, insertion = float(ordered["deletion"].area.mean()), float(ordered["insertion"].area.mean())
        columns = {"deletion_audc": deletion, "deletion_gain": float(baseline["deletion"].area.mean()) - deletion,
                   "insertion_auc": insertion, "insertion_gain": insertion - float(baseline["insertion"].area.mean())}
        return columns, (ordered["deletion"].counts.cpu(), ordered["deletion"].scores.mean(0).cpu())


class ExplanationComparison:
    """Score every contender on a test set; write the table, curves and a method grid.

    ``models``: name -> {"head": "linear" | "softcam", "checkpoint": path, "branch": bool}; a
    ``branch`` checkpoint is a whole ``SigmoidBranchClassifier`` (configs/train_sigmoid_branch.json).
    ``network_options``: the classifier factory's other arguments (backbone, spatial_dims, ...) and the
    preprocessing (image_size, window): a checkpoint that describes itself must agree with them and with its
    entry's head and branch (``bundle.checkpoints.network_for_checkpoint``); one that does not is built with them.
    ``deletion_patch``: patch side of deletion and insertion; ``deletion_fraction``: the share of
    the patches deleted one at a time (the reference's 14 of ~256, about 6 %). ``top_k`` /
    ``top_k_threshold`` / ``localisation_patch``: top-k localisation precision (picks of raw
    evidence above the threshold); ``box_thresholds``: tau steps of MaxBoxAccV2 (100: 0.01);
    ``loc_threshold``: tau of GT-Loc and Top-1 Loc; ``pointing_tolerance``: a pointing-game hit may
    lie this many pixels (voxels) from the mask. ``randomisation_images`` (0: skipped) /
    ``randomised_backbone_layers``: the sanity check re-initialises this many parameterised backbone
    modules counted from the output, and the explaining head. ``seed``: random patch order and random maps.
    """

    def __init__(self, test_set, models: dict[str, dict], network_options: dict, output_dir: str,
                 contenders: list[Contender] | None = None, device: str | torch.device = "cpu", batch_size: int = 16,
                 deletion_patch: int = 8, deletion_fraction: float = 0.06, top_k: int = 3, top_k_threshold: float = 0.0,
                 localisation_patch: int = 16, randomisation_images: int = 8, randomised_backbone_layers: int = 3,
                 ordinal: bool = False, grid_images: int = 6, box_thresholds: int = 100, loc_threshold: float = 0.2,
                 pointing_tolerance: float = 0.0, seed: int = 0, tracking=None):
        self.test_set, self.models, self.network_options = test_set, models, network_options
        self.output_dir = Path(output_dir)
        self.contenders = contenders or default_contenders(models)
        self.device, self.batch_size = torch.device(device), batch_size
        self.perturbation = PerturbationTest(test_set, deletion_patch, deletion_fraction, batch_size, self.device)
        self.localisation_options = LocalisationOptions(top_k, top_k_threshold, localisation_patch, pointing_tolerance,
                                                        box_thresholds, loc_threshold)
        self.randomisation_images, self.randomised_backbone_layers = randomisation_images, randomised_backbone_layers
        self.ordinal, self.grid_images, self.seed, self.tracking = ordinal, grid_images, seed, tracking

    def load_model(self, name: str) -> torch.nn.Module | None:
        spec = self.models[name]
        path = Path(spec["checkpoint"])
        if not path.is_file():
            logger.info("comparison: no checkpoint for %r (%s): its rows are left out", name, path)
            return None
        net = network_for_checkpoint(path, head=spec["head"], branch=bool(spec.get("branch")), **self.network_options)
        load_checkpoint(net, path)
        return net.to(self.device).eval()

    # --- the table ----------------------------------------------------------------------------
    def run(self) -> list[dict]:
        test = self.test_set
        models, logits = {}, {}
        for name in dict.fromkeys(c.model for c in self.contenders):
            model = self.load_model(name)
            if model is not None:
                models[name], logits[name] = model, batched_logits(model, test.images, self.batch_size, self.device)
        if not models:
            raise FileNotFoundError("comparison: none of the models to compare has a checkpoint: train them first")
        all_correct = torch.stack([lg.argmax(1) == test.labels for lg in logits.values()]).all(0)
        annotated, lesion = test.masks.flatten(1).any(1), (test.labels > 0) & all_correct
        logger.info("comparison: %d test images, %d annotated, %d lesion images classified correctly by all %d models",
                    len(test.labels), int(annotated.sum()), int(lesion.sum()), len(models))
        shape = (int(lesion.sum()), *test.images.shape[2:])
        random_order = faithfulness.random_patch_maps(shape, self.perturbation.patch, self.seed)
        baselines = {}  # each model's curves in a random patch order: the baseline of its rows
        if lesion.any():
            baselines = {name: self.perturbation.curves(model, random_order, lesion) for name, model in models.items()}
        rows, curves, box_curves, grid = [], {}, {}, {}
        for contender in (c for c in self.contenders if c.model in models):
            row, curve, box_curve, shown = self.score(contender, models[contender.model], logits[contender.model],
                                                      annotated, lesion, baselines.get(contender.model))
            rows.append(row)
            curves[contender.label], grid[contender.label] = curve, shown
            if box_curve is not None:
                box_curves[contender.label] = box_curve
            logger.info("comparison: %s done (%.3f s / image)", contender.label, row["seconds_per_image"])
        raw_shapes = dict.fromkeys(row.pop("_raw_shape") for row in list(rows))
        for grid_shape in raw_shapes if annotated.any() else []:  # ceiling and chance at every map resolution
            for row, box_curve in reference_rows(test, grid_shape, self.localisation_options, self.seed, self.device):
                rows.append(row)
                box_curves[row["method"]] = box_curve
        random_curves = {name: (c["deletion"].counts.cpu(), c["deletion"].scores.mean(0).cpu()) for name, c in baselines.items()}
        files = report.write_outputs(self.output_dir, rows, test, (curves, random_curves, self.perturbation.total_patches()),
                                     box_curves, self.localisation_options.loc_threshold,
                                     (grid, grid_indices(annotated, self.grid_images)))
        if self.tracking is not None:
            counts = {"n_test": len(test.labels), "n_annotated": int(annotated.sum()), "n_lesion_all_correct": int(lesion.sum())}
            self.tracking.log_comparison(rows, files, counts, describe(self.models, (c for c in self.contenders if c.model in models)))
        return rows

    def score(self, contender: Contender, model, logits: torch.Tensor, annotated: torch.Tensor, lesion: torch.Tensor,
              baseline: dict | None) -> tuple[dict, tuple, tuple | None, torch.Tensor]:
        """One row, its mean deletion curve, its BoxAcc curves and the maps of the grid's images."""
        test = self.test_set
        predicted = logits.argmax(1)
        explainer = make_explainer(contender.method, model, contender.target)
        start = time.perf_counter()
        maps, raw_shape = batched_maps(explainer, test.images, predicted, self.batch_size)
        seconds = (time.perf_counter() - start) / len(test.images)
        # the disease class's map on every image: the lesion's class where there is one
        disease = disease_classes(test.labels, logits)
        disease_maps = maps.clone()
        redo = disease != predicted
        if redo.any():
            disease_maps[redo] = batched_maps(explainer, test.images[redo], disease[redo], self.batch_size)[0]

        def classify(x: torch.Tensor) -> torch.Tensor:
            return model(x.to(self.device)).float()

        images = test.images.to(self.device)
        change = faithfulness.confidence_change(classify, images, maps.to(self.device), predicted.to(self.device),
                                                self.batch_size)
        row = {"method": contender.label, "kind": "method", "family": EXPLAINERS[contender.method].family,
               **classification(logits, test.labels, self.ordinal),
               "average_drop": float(change.drop.mean()), "increase_in_confidence": 100 * float(change.increase.double().mean())}
        perturbation, curve = self.perturbation.columns(model, disease_maps[lesion], lesion, baseline)
        row.update(perturbation)
        columns, box_curve = localisation_scores(disease_maps[annotated].to(self.device), test.masks[annotated].to(self.device),
                                                 predicted[annotated], test.labels[annotated], self.localisation_options)
        row.update(columns)
        row.update(sign_columns(disease_maps, test.labels > 0))
        row["randomisation_correlation"] = math.nan if self.randomisation_images <= 0 else randomisation_correlation(
            model, contender, test.images[: self.randomisation_images].to(self.device), self.randomised_backbone_layers)
        row["seconds_per_image"] = seconds
        row["raw_map_shape"], row["_raw_shape"] = "x".join(map(str, raw_shape)), raw_shape
        return row, curve, box_curve, maps[grid_indices(annotated, self.grid_images)]


def randomisation_correlation(model, contender: Contender, images: torch.Tensor, backbone_layers: int) -> float:
    """Parameter-randomisation sanity check (Adebayo et al. 2018) on ``images`` for their predicted
    classes: the same backbone layers, counted from the output, for every row, and the explaining head."""
    with torch.no_grad():
        targets = model(images).argmax(1)
    head = target_named(contender.target).explaining_head(model)
    layers = faithfulness.layers_from_output(model, model.features, head, backbone_layers)

    def explain(net, x, t):
        return make_explainer(contender.method, net, contender.target)(x, t).upsampled[:, 0]

    return _nanmean(faithfulness.parameter_randomisation_correlation(model, explain, images, targets, layers, seed=0))
