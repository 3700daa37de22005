"""The comparison's outputs: the table (CSV and Markdown), the deletion curves, the BoxAcc-vs-tau
curves and the grid of maps. Rows are dicts of column -> value; ``kind`` tells a method's row
("method") from the ceiling ("ideal") and chance ("random") rows of a map resolution, which fill
the localisation columns only."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from bundle.explain.claims import write_claims
from bundle.visualize import minmax

# (column, header, higher is better): the order of the table
COLUMNS = (
    ("accuracy", "Acc", True), ("balanced_accuracy", "BalAcc", True), ("auc", "AUC", True), ("kappa", "Kappa", True),
    ("average_drop", "AvgDrop %", False), ("increase_in_confidence", "IncConf %", True),
    ("deletion_audc", "Deletion AUDC", False), ("deletion_gain", "Del. gain vs random", True),
    ("insertion_auc", "Insertion AUC", True), ("insertion_gain", "Ins. gain vs random", True),
    ("activation_precision", "Act. precision", True), ("activation_sensitivity", "Act. sensitivity", True),
    ("top_k_precision", "Top-k precision", True), ("pointing_game", "Pointing game", True), ("pxap", "PxAP", True),
    ("max_box_acc_v2", "MaxBoxAccV2", True), ("gt_loc", "GT-Loc", True), ("top1_loc", "Top-1 Loc", True),
    ("sign_consistency", "Sign consistency", True), ("sign_positive_lesion", "+ on lesion", True),
    ("sign_negative_healthy", "- on healthy", True), ("randomisation_correlation", "Rand. corr.", False),
    ("seconds_per_image", "s / image", False),
)
LOCALISATION = ("activation_precision", "activation_sensitivity", "top_k_precision", "pointing_game", "pxap",
                "max_box_acc_v2", "gt_loc", "top1_loc")


def write_csv(path: Path, rows: list[dict]) -> Path:
    """One line per row: ``method``, ``kind``, the explainer's ``family`` (method rows), every column of
    ``COLUMNS`` (empty where it does not apply), ``raw_map_shape``."""
    columns = ["method", "kind", "family", *[key for key, _, _ in COLUMNS], "raw_map_shape"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items() if k in columns} for row in rows)
    return path


def write_markdown(path: Path, rows: list[dict]) -> Path:
    """The table as in the papers, the best method's value of each column in bold; the ceiling and
    chance rows of each map resolution follow in italics."""
    header = "| method | " + " | ".join(f"{title} {'↑' if up else '↓'}" for _, title, up in COLUMNS) + " |"
    lines = [header, "| --- " * (len(COLUMNS) + 1) + "|"]
    methods = [row for row in rows if row.get("kind", "method") == "method"]
    best = {}
    for key, _, up in COLUMNS:
        values = [row[key] for row in methods if not math.isnan(row.get(key, math.nan))]
        best[key] = (max(values) if up else min(values)) if values and key != "seconds_per_image" else None
    for row in rows:
        method_row = row.get("kind", "method") == "method"
        cells = []
        for key, _, _ in COLUMNS:
            value = row.get(key, math.nan)
            text = "n/a" if math.isnan(value) else f"{value:.3f}"
            cells.append(f"**{text}**" if method_row and best[key] is not None and value == best[key] else text)
        name = row["method"] if method_row else f"*{row['method']}*"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_box_curves(path: Path, curves: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]]) -> Path:
    """BoxAcc(tau, delta) of every row in long form: method, tau, delta, box_acc (any component's
    box, MaxBoxAccV2's curve), largest_box_acc (the largest component's box: GT-Loc at that tau)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "tau", "delta", "box_acc", "largest_box_acc"])
        for label, (taus, every, largest, deltas) in curves.items():
            for d, delta in enumerate(deltas):
                for t, tau in enumerate(taus.tolist()):
                    writer.writerow([label, f"{tau:.3f}", delta, f"{float(every[d, t]):.4f}", f"{float(largest[d, t]):.4f}"])
    return path


def _legend_style(label: str) -> str:
    return "-" if "SoftCAM" in label else "--"


def plot_deletion_curves(path: Path, curves: dict[str, tuple[torch.Tensor, torch.Tensor]],
                         random_curves: dict[str, tuple[torch.Tensor, torch.Tensor]], total_patches: int) -> Path:
    """Mean deletion curve (min(p', p) / p against the patches deleted) of every row, and of every
    model in a random patch order (dotted, in greys): the baseline a map's order has to beat."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for label, (counts, scores) in curves.items():
        if len(counts):
            ax.plot(counts.numpy(), scores.numpy(), label=label, linestyle=_legend_style(label))
    greys = ("black", "dimgrey", "grey", "darkgrey", "silver")
    for i, (model, (counts, scores)) in enumerate(random_curves.items()):
        if len(counts):
            ax.plot(counts.numpy(), scores.numpy(), label=f"{model}: random order", linestyle=":", color=greys[i % len(greys)])
    ax.set_xlabel(f"patches deleted, most evidence first (of {total_patches})")
    ax.set_ylabel("min(p', p) / p of the lesion class")
    ax.set_title("Deletion curves on lesion images (lower area = more faithful)")
    if ax.get_legend_handles_labels()[0]:  # no curve when no lesion image is classified correctly by every model
        ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_box_accuracy(path: Path, curves: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]],
                      loc_threshold: float, delta: float = 0.5) -> Path:
    """BoxAcc against tau at IoU ``delta`` for every row: any component's box (left, MaxBoxAccV2 is
    the mean over deltas of each curve's maximum) and the largest component's box (right, GT-Loc
    reads it at ``loc_threshold``)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for label, (taus, every, largest, deltas) in curves.items():
        d = list(deltas).index(delta)
        style = ":" if label.startswith(("ideal", "random")) else _legend_style(label)
        axes[0].plot(taus.numpy(), every[d].numpy(), label=label, linestyle=style)
        axes[1].plot(taus.numpy(), largest[d].numpy(), label=label, linestyle=style)
    for ax, title in zip(axes, ("every component's box (MaxBoxAccV2)", "largest component's box (GT-Loc)")):
        ax.axvline(loc_threshold, color="black", linewidth=0.6)
        ax.set_xlabel("tau (threshold / max of minmax(ReLU(map)))")
        ax.set_title(f"{title}, IoU >= {delta}", fontsize=9)
    axes[0].set_ylabel("BoxAcc: fraction of lesion images hit")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _slice_of(mask: torch.Tensor) -> int:
    """The slice (last axis) of a 3D mask with the most lesion, or the middle one."""
    per_slice = mask.flatten(0, -2).sum(0)
    return int(per_slice.argmax()) if per_slice.any() else mask.shape[-1] // 2


def plot_grid(path: Path, test, grid: dict[str, torch.Tensor], indices: torch.Tensor) -> Path:
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


def write_outputs(out: Path, rows: list[dict], test, deletion: tuple, box_curves: dict, loc_threshold: float,
                  grid: tuple) -> list[Path]:
    """Every file of a comparison under ``out``: the table (CSV, Markdown), the claim's answers, the BoxAcc
    curves (CSV, plot), the deletion curves and the method grid. ``deletion``: (curves, random-order curves,
    number of patches); ``grid``: (maps by row, the test images shown)."""
    out.mkdir(parents=True, exist_ok=True)
    curves, random_curves, total = deletion
    return [write_csv(out / "comparison.csv", rows), write_markdown(out / "comparison.md", rows),
            write_claims(out / "claims.md", rows),
            write_box_curves(out / "box_accuracy_curves.csv", box_curves),
            plot_box_accuracy(out / "box_accuracy.png", box_curves, loc_threshold),
            plot_deletion_curves(out / "deletion_curves.png", curves, random_curves, total),
            plot_grid(out / "method_grid.png", test, *grid)]
