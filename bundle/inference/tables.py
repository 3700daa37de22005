"""The tables of an inference run (predictions.csv / .json, failures.csv) and its summary for tracking."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from bundle.files import atomic_write
from bundle.inputs import InferenceInput, InputFailure
from bundle.writers.common import ModelIdentity


class InputsFailed(SystemExit):
    """Some inputs failed: ends ``python -m monai.bundle run`` with status 2 after all outputs are written.

    A SystemExit, like ``bundle.data.DatalistError``, so the config machinery does not wrap it.
    """

    def __init__(self, failed: int, total: int, failures_csv: Path):
        self.message = f"{failed} of {total} inputs could not be processed: see {failures_csv}"
        super().__init__(2)  # an integer status prints nothing: run() writes the message to stderr


@dataclass
class InferenceResult:
    """What one input produced. ``outputs`` maps a writer's kind ("nifti", "png", "sc", "pm") to its
    files, relative to the output folder; ``notes``: source attributes dropped or repaired (names only);
    ``resumed``: taken from an earlier run's completion record rather than computed now."""

    input: InferenceInput
    probabilities: list[float]
    predicted_class: int
    outputs: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    resumed: bool = False


@dataclass(frozen=True)
class InferenceSummary:
    """What tracking receives: no input paths, no source attribute values.

    ``rows``: per result, in table order, (kind, frame (1-based, None for whole inputs), predicted
    class, probabilities); ``overlays``: the absolute paths of the PNG overlays, in the same order.
    """

    model: ModelIdentity
    spatial_dims: int
    all_classes: bool
    processed: int
    resumed: int
    failed: int
    rows: list[tuple[str, int | None, int, list[float]]]
    overlays: list[Path]


def summarize(results: list[InferenceResult], failures: list[InputFailure], output_dir: Path, model: ModelIdentity,
              spatial_dims: int, all_classes: bool) -> InferenceSummary:
    return InferenceSummary(
        model=model, spatial_dims=spatial_dims, all_classes=all_classes,
        processed=sum(not r.resumed for r in results), resumed=sum(r.resumed for r in results), failed=len(failures),
        rows=[(r.input.kind, None if r.input.frame is None else r.input.frame + 1, r.predicted_class, r.probabilities)
              for r in results],
        overlays=[Path(output_dir) / png for r in results for png in r.outputs.get("png", [])],
    )


def write_tables(output_dir: Path, results: list[InferenceResult], failures: list[InputFailure],
                 class_names: dict[int, str], model: ModelIdentity) -> None:
    """predictions.csv (a row per input: where, what, the class probabilities, the model), predictions.json
    (the same rows with each input's output files) and failures.csv (a row per input that failed, why)."""
    def name(k: int) -> str:
        return class_names.get(k, f"class {k}")

    names = [name(k) for k in range(len(results[0].probabilities))] if results else []
    rows = [{
        "input": str(r.input.files[0].parent if r.input.kind == "dicom-series" else r.input.files[0]),
        "frame": "" if r.input.frame is None else r.input.frame + 1,
        "kind": r.input.kind,
        "predicted_class": r.predicted_class,
        "predicted_label": name(r.predicted_class),
        **{f"p_{label}": round(p, 6) for label, p in zip(names, r.probabilities)},
        "model": model.name,
        "model_version": model.version,
        "weights": model.weights_digest,
        "notes": "; ".join(r.notes),
    } for r in results]
    output_dir = Path(output_dir)
    _write_csv(output_dir / "predictions.csv", rows, list(rows[0]) if rows else ["input"])
    with atomic_write(output_dir / "predictions.json") as tmp:
        tmp.write_text(json.dumps([{**row, "outputs": r.outputs} for row, r in zip(rows, results)], indent=1))
    _write_csv(output_dir / "failures.csv", [{"input": str(f.path), "reason": f.reason} for f in failures],
               ["input", "reason"])


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
