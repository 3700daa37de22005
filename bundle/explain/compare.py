"""Compare every explanation method on one test split: one table shaped like the papers' tables.

Rows ("contenders"): the black box with each post-hoc method; the black box with the dual-branch
sigmoid head (Oh & Noh) under each CAM variant; dense SoftCAM; sparse SoftCAM; SoftCAM with a
sigmoid evidence branch. Columns: classification metrics of the row's classifier, then explanation
metrics of the row's maps. A model whose checkpoint is missing is left out with a log line, so a
user compares what they trained.

Which class is explained:
- faithfulness (Average Drop / Increase in Confidence on every test image; deletion and insertion
  on the images every compared model classifies correctly, as the SoftCAM paper does): the class the
  classifier predicts;
- localisation (against the lesion masks, on annotated images only): the lesion's class, the
  ground truth, as weakly supervised localisation benchmarks do ("GT-known");
- sign consistency: the raw signed map of the predicted class, diseased vs healthy images.

Writes ``comparison.csv``, ``comparison.md``, ``deletion_curves.png`` and ``method_grid.png`` to
``output_dir`` and, with a tracking URI, logs them and the table's numbers to an MLflow run.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.transforms import Compose

from bundle.checkpoints import load_checkpoint
from bundle.explain import localisation as loc
from bundle.explain import metrics
from bundle.explain.methods import make_explainer
from bundle.networks.classifier import classifier
from bundle.networks.sigmoid_branch import SigmoidBranchClassifier
from bundle.visualize import minmax

logger = logging.getLogger(__name__)

POST_HOC = ("cam", "gradcam", "gradcampp", "xgradcam", "layercam", "scorecam", "integrated_gradients", "guided_backprop")
CAM_VARIANTS = ("cam", "gradcam", "gradcampp", "xgradcam", "layercam", "scorecam")
METHOD_NAMES = {
    "softcam": "SoftCAM", "cam": "CAM", "gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM", "scorecam": "Score-CAM", "integrated_gradients": "Integrated Gradients",
    "guided_backprop": "Guided Backprop",
}
# (column, header, higher is better): the order of the table
COLUMNS = (
    ("accuracy", "Acc", True), ("balanced_accuracy", "BalAcc", True), ("auc", "AUC", True), ("kappa", "Kappa", True),
    ("average_drop", "AvgDrop %", False), ("increase_in_confidence", "IncConf %", True),
    ("deletion_audc", "Deletion AUDC", False), ("insertion_auc", "Insertion AUC", True),
    ("activation_precision", "Act. precision", True), ("activation_sensitivity", "Act. sensitivity", True),
    ("top_k_precision", "Top-k precision", True), ("pointing_game", "Pointing game", True), ("pxap", "PxAP", True),
    ("max_box_acc_v2", "MaxBoxAccV2", True), ("gt_loc", "GT-Loc", True), ("top1_loc", "Top-1 Loc", True),
    ("sign_consistency", "Sign consistency", True), ("randomisation_correlation", "Rand. corr.", False),
    ("seconds_per_image", "s / image", False),
)


@dataclass(frozen=True)
class Contender:
    """One row: ``method`` explaining the classifier ``model`` (a key of the comparison's models)."""

    label: str
    model: str
    method: str
    branch: bool = False


def default_contenders() -> list[Contender]:
    """The rows of both papers' tables, plus the unpublished SoftCAM + sigmoid evidence branch."""
    rows = [Contender(f"black box + {METHOD_NAMES[m]}", "black box", m) for m in POST_HOC]
    rows += [Contender(f"black box + dual branch + {METHOD_NAMES[m]}", "black box + dual branch", m, True) for m in CAM_VARIANTS]
    rows += [Contender("dense SoftCAM", "dense SoftCAM", "softcam"), Contender("sparse SoftCAM", "sparse SoftCAM", "softcam"),
             Contender("SoftCAM + sigmoid branch", "SoftCAM + sigmoid branch", "softcam", True)]
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


class ExplanationComparison:
    """Score every contender on a test set; write the table, deletion curves and a method grid.

    ``models``: name -> {"head": "linear" | "softcam", "checkpoint": path, "branch": bool}; a
    ``branch`` checkpoint is a whole ``SigmoidBranchClassifier`` (configs/train_sigmoid_branch.json).
    ``network_options``: the classifier factory's other arguments (backbone, spatial_dims, ...).
    ``deletion_patch`` / ``deletion_steps``: patch side and number of steps of deletion and insertion;
    ``top_k`` / ``localisation_patch``: top-k localisation precision; ``randomisation_images`` /
    ``randomised_layers``: the sanity check (0 images: skipped); ``box_thresholds``: tau grid of MaxBoxAccV2;
    ``pointing_tolerance``: a pointing-game hit may lie this many pixels (voxels) from the mask.
    """

    def __init__(
        self,
        test_set,
        models: dict[str, dict],
        network_options: dict,
        output_dir: str,
        contenders: list[Contender] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        deletion_patch: int = 8,
        deletion_steps: int = 16,
        top_k: int = 3,
        localisation_patch: int = 16,
        randomisation_images: int = 8,
        randomised_layers: int = 3,
        ordinal: bool = False,
        grid_images: int = 6,
        box_thresholds: int = 20,
        pointing_tolerance: float = 0.0,
        tracking=None,
    ):
        self.test_set = test_set
        self.models = models
        self.network_options = network_options
        self.output_dir = Path(output_dir)
        self.contenders = contenders or default_contenders()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.deletion_patch = deletion_patch
        self.deletion_steps = deletion_steps
        self.top_k = top_k
        self.localisation_patch = localisation_patch
        self.randomisation_images = randomisation_images
        self.randomised_layers = randomised_layers
        self.ordinal = ordinal
        self.grid_images = grid_images
        self.box_thresholds = box_thresholds
        self.pointing_tolerance = pointing_tolerance
        self.tracking = tracking

    # --- models -------------------------------------------------------------------------------
    def load_model(self, name: str) -> torch.nn.Module | None:
        spec = self.models[name]
        path = Path(spec["checkpoint"])
        if not path.is_file():
            logger.info("comparison: no checkpoint for %r (%s): its rows are left out", name, path)
            return None
        net = classifier(head=spec["head"], **self.network_options)
        if spec.get("branch"):
            net = SigmoidBranchClassifier.from_classifier(net)
        load_checkpoint(net, path)
        return net.to(self.device).eval()

    @torch.no_grad()
    def _logits(self, model: torch.nn.Module) -> torch.Tensor:
        images = self.test_set.images
        return torch.cat([model(images[i : i + self.batch_size].to(self.device)).float().cpu()
                          for i in range(0, len(images), self.batch_size)])

    def classification(self, logits: torch.Tensor) -> dict[str, float]:
        labels = self.test_set.labels
        predicted = logits.argmax(1)
        return {
            "accuracy": float(metrics.accuracy(predicted, labels)),
            "balanced_accuracy": float(metrics.balanced_accuracy(predicted, labels, logits.shape[1])),
            "auc": float(metrics.roc_auc(logits.softmax(1), labels)),
            "kappa": float(metrics.cohen_kappa(predicted, labels, logits.shape[1], "quadratic" if self.ordinal else None)),
        }

    # --- maps ---------------------------------------------------------------------------------
    def explain(self, explainer, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Upsampled maps (N, *S) on the CPU and the raw maps' spatial shape, batch by batch."""
        maps, raw_shape = [], None
        for i in range(0, len(images), self.batch_size):
            explanation = explainer(images[i : i + self.batch_size], targets[i : i + self.batch_size])
            maps.append(explanation.upsampled[:, 0].cpu())
            raw_shape = tuple(explanation.raw.shape[2:])
        return torch.cat(maps), raw_shape

    # --- the table ----------------------------------------------------------------------------
    def run(self) -> list[dict]:
        test = self.test_set
        models, logits = {}, {}
        for name in dict.fromkeys(c.model for c in self.contenders):
            model = self.load_model(name)
            if model is not None:
                models[name], logits[name] = model, self._logits(model)
        if not models:
            raise FileNotFoundError("comparison: none of the models to compare has a checkpoint: train them first")
        contenders = [c for c in self.contenders if c.model in models]
        all_correct = torch.stack([lg.argmax(1) == test.labels for lg in logits.values()]).all(0)
        annotated = test.masks.flatten(1).any(1)
        logger.info("comparison: %d test images, %d annotated, %d classified correctly by all %d models",
                    len(test.labels), int(annotated.sum()), int(all_correct.sum()), len(models))
        rows, curves, grid = [], {}, {}
        for contender in contenders:
            row, curve, shown = self.score(contender, models[contender.model], logits[contender.model], all_correct, annotated)
            rows.append(row)
            curves[contender.label], grid[contender.label] = curve, shown
            logger.info("comparison: %s done (%.3f s / image)", contender.label, row["seconds_per_image"])
        self.output_dir.mkdir(parents=True, exist_ok=True)
        files = [write_csv(self.output_dir / "comparison.csv", rows), write_markdown(self.output_dir / "comparison.md", rows),
                 plot_curves(self.output_dir / "deletion_curves.png", curves),
                 plot_grid(self.output_dir / "method_grid.png", test, grid, self._grid_indices(annotated))]
        if self.tracking is not None:
            self.tracking.log_comparison(rows, files, {"n_test": len(test.labels), "n_annotated": int(annotated.sum()),
                                                       "n_all_correct": int(all_correct.sum())})
        return rows

    def _grid_indices(self, annotated: torch.Tensor) -> torch.Tensor:
        """Annotated images first (the lesion to look for), then healthy ones."""
        order = torch.cat([torch.nonzero(annotated).flatten(), torch.nonzero(~annotated).flatten()])
        return order[: self.grid_images]

    def score(self, contender: Contender, model, logits: torch.Tensor, all_correct: torch.Tensor,
              annotated: torch.Tensor) -> tuple[dict, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        test = self.test_set
        predicted = logits.argmax(1)
        explainer = make_explainer(contender.method, model, branch=contender.branch)
        start = time.perf_counter()
        maps, raw_shape = self.explain(explainer, test.images, predicted)
        seconds = (time.perf_counter() - start) / len(test.images)
        # localisation explains the lesion's class: re-explain the annotated images predicted otherwise
        lesion_maps = maps.clone()
        redo = annotated & (predicted != test.labels)
        if redo.any():
            lesion_maps[redo] = self.explain(explainer, test.images[redo], test.labels[redo])[0]

        def classify(x: torch.Tensor) -> torch.Tensor:
            return model(x.to(self.device)).float()

        images, maps_dev = test.images.to(self.device), maps.to(self.device)
        change = metrics.confidence_change(classify, images, maps_dev, predicted.to(self.device), self.batch_size)
        row = {"method": contender.label, **self.classification(logits),
               "average_drop": float(change.drop.mean()), "increase_in_confidence": 100 * float(change.increase.double().mean())}
        keep = all_correct.to(self.device)
        if keep.any():
            # deleted patches take the mean intensity of the test images (the images are in [0, 1], not centred)
            perturb = {"patch_size": self.deletion_patch, "num_steps": self.deletion_steps, "baseline": float(test.images.mean()),
                       "chunk_size": self.batch_size}
            targets = predicted.to(self.device)[keep]
            deletion = metrics.deletion_curve(classify, images[keep], maps_dev[keep], targets, **perturb)
            insertion = metrics.insertion_curve(classify, images[keep], maps_dev[keep], targets, **perturb)
            row["deletion_audc"], row["insertion_auc"] = float(deletion.area.mean()), float(insertion.area.mean())
            curve = (deletion.fractions.cpu(), deletion.scores.mean(0).cpu())
        else:
            row["deletion_audc"] = row["insertion_auc"] = math.nan
            curve = (torch.zeros(0), torch.zeros(0))
        row.update(self.localisation(lesion_maps[annotated], test.masks[annotated], predicted[annotated], test.labels[annotated]))
        row["sign_consistency"] = _nanmean(metrics.evidence_sign_consistency(maps, test.labels > 0))
        row["randomisation_correlation"] = self.randomisation(model, contender)
        row["seconds_per_image"] = seconds
        row["raw_map_shape"] = "x".join(map(str, raw_shape))
        return row, curve, maps[self._grid_indices(annotated)]

    def localisation(self, maps: torch.Tensor, masks: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor) -> dict:
        if not len(maps):
            return {key: math.nan for key in ("activation_precision", "activation_sensitivity", "top_k_precision",
                                              "pointing_game", "pxap", "max_box_acc_v2", "gt_loc", "top1_loc")}
        maps, masks = maps.to(self.device), masks.to(self.device)
        return {
            "activation_precision": _nanmean(loc.activation_precision(maps, masks)),
            "activation_sensitivity": _nanmean(loc.activation_sensitivity(maps, masks)),
            "top_k_precision": _nanmean(loc.top_k_localisation_precision(maps, masks, self.top_k, self.localisation_patch)),
            "pointing_game": _nanmean(loc.pointing_game(maps, masks, self.pointing_tolerance)),
            "pxap": float(loc.pxap_dataset(maps, masks)),
            # tau in steps of 1 / box_thresholds: labelling components at every tau is the costly part on a CPU
            "max_box_acc_v2": float(loc.max_box_accuracy(maps, masks, self.box_thresholds).max_box_acc),
            "gt_loc": _nanmean(loc.gt_localisation(maps, masks)),
            "top1_loc": _nanmean(loc.top1_localisation(maps, masks, predicted, labels)),
        }

    def randomisation(self, model, contender: Contender) -> float:
        """Parameter-randomisation sanity check on the first few test images (Adebayo et al. 2018)."""
        if self.randomisation_images <= 0:
            return math.nan
        images = self.test_set.images[: self.randomisation_images].to(self.device)
        with torch.no_grad():
            targets = model(images).argmax(1)

        def explain(net, x, t):
            return make_explainer(contender.method, net, branch=contender.branch)(x, t).upsampled[:, 0]

        correlation = metrics.parameter_randomisation_correlation(model, explain, images, targets, self.randomised_layers, seed=0)
        return _nanmean(correlation)


def _nanmean(values: torch.Tensor) -> float:
    return float(torch.nanmean(values.double())) if values.numel() else math.nan


def write_csv(path: Path, rows: list[dict]) -> Path:
    columns = ["method", *[key for key, _, _ in COLUMNS], "raw_map_shape"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)
    return path


def write_markdown(path: Path, rows: list[dict]) -> Path:
    """The table as in the papers, the best value of each explanation column in bold."""
    header = "| method | " + " | ".join(f"{title} {'↑' if up else '↓'}" for _, title, up in COLUMNS) + " |"
    lines = [header, "| --- " * (len(COLUMNS) + 1) + "|"]
    best = {}
    for key, _, up in COLUMNS:
        values = [row[key] for row in rows if not math.isnan(row[key])]
        best[key] = (max(values) if up else min(values)) if values else None
    for row in rows:
        cells = []
        for key, _, _ in COLUMNS:
            value = row[key]
            text = "n/a" if math.isnan(value) else f"{value:.3f}"
            cells.append(f"**{text}**" if best[key] is not None and value == best[key] and key != "seconds_per_image" else text)
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_curves(path: Path, curves: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Path:
    """Mean deletion curve (min(p', p) / p against the fraction of patches deleted) of every row."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for label, (fractions, scores) in curves.items():
        if len(fractions):
            ax.plot(fractions.numpy(), scores.numpy(), label=label, linestyle="-" if "SoftCAM" in label else "--")
    ax.set_xlabel("fraction of patches deleted (most evidence first)")
    ax.set_ylabel("min(p', p) / p")
    ax.set_title("Deletion curves (lower area = more faithful)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _slice_of(mask: torch.Tensor) -> int:
    """The slice (last axis) of a 3D mask with the most lesion, or the middle one."""
    per_slice = mask.flatten(0, -2).sum(0)
    return int(per_slice.argmax()) if per_slice.any() else mask.shape[-1] // 2


def plot_grid(path: Path, test: TestSet, grid: dict[str, torch.Tensor], indices: torch.Tensor) -> Path:
    """The same test images (columns) under every method (rows); the lesion outlined in white.
    3D volumes show the slice with the most lesion (the middle one for healthy volumes)."""
    import matplotlib.pyplot as plt

    def plane(volume: torch.Tensor, k: int | None):
        return (volume[..., k] if k is not None else volume).T.numpy()  # MONAI (x, y) -> (rows, cols)

    n = len(indices)
    fig, axes = plt.subplots(len(grid) + 1, n, figsize=(1.6 * n, 1.6 * (len(grid) + 1)), squeeze=False)
    for j, index in enumerate(indices.tolist()):
        mask = test.masks[index]
        k = _slice_of(mask) if mask.ndim == 3 else None
        image, outline = plane(test.images[index, 0], k), plane(mask.float(), k)
        axes[0, j].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(f"label {int(test.labels[index])}", fontsize=7)
        for i, (label, maps) in enumerate(grid.items(), start=1):
            axes[i, j].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[i, j].imshow(plane(minmax(maps[j : j + 1])[0], k), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if outline.any():
                axes[i, j].contour(outline, levels=[0.5], colors="white", linewidths=0.6)
            if j == 0:
                axes[i, j].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
