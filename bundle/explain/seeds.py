"""The same comparison trained from several seeds: mean and spread across seeds of the claim columns.

A paired bootstrap interval (``comparison.csv``'s ``_ci_`` columns) says how much a figure moves with
the test images; it says nothing about how much it moves with the training seed (initialisation,
augmentation, batch order). ``make demo-full`` trains every model from several seeds on the same data
and split; this module reads each seed's ``comparison.csv`` and tabulates, per row and claim column,
the mean, the sample standard deviation and the range across seeds. Every figure it prints comes from
those files.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

# (column, title): the columns the claims are made on, in the order they are shown
SEED_COLUMNS = (("auc", "ROC AUC"), ("activation_precision", "activation precision"), ("pxap", "PxAP"),
                ("deletion_audc", "deletion AUDC"), ("lesion_evidence_share", "lesion evidence share"),
                ("distant_evidence_share", "distant evidence share"), ("twin_auc", "twin AUC"),
                ("road_morf", "ROAD MoRF"), ("road_lerf", "ROAD LeRF"))


def _number(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_comparison(path: Path) -> dict[str, dict[str, float]]:
    """The method rows (kind "method") of one ``comparison.csv``: method -> column -> value."""
    with Path(path).open(newline="") as f:
        return {row["method"]: {key: _number(row.get(key)) for key, _ in SEED_COLUMNS}
                for row in csv.DictReader(f) if row.get("kind", "method") == "method"}


def across_seeds(tables: dict[str, dict[str, dict[str, float]]]) -> list[dict]:
    """Rows (method, column, seeds, mean, sd, low, high) over the seeds' tables (seed -> read_comparison).
    A method or column missing (or NaN) in a seed's table is left out of that seed's figures; ``seeds``
    says how many seeds a figure rests on, and ``sd`` is NaN below two."""
    methods = list(dict.fromkeys(m for table in tables.values() for m in table))
    rows = []
    for method in methods:
        for key, title in SEED_COLUMNS:
            values = [v for t in tables.values() if not math.isnan(v := t.get(method, {}).get(key, math.nan))]
            if not values:
                continue
            rows.append({"method": method, "column": key, "title": title, "seeds": len(values),
                         "mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else math.nan,
                         "low": min(values), "high": max(values)})
    return rows


def write_seed_summary(out: Path, tables: dict[str, dict[str, dict[str, float]]]) -> tuple[Path, Path]:
    """``seeds.csv`` and ``seeds.md`` in ``out``: one line per method, a cell per claim column
    "mean ± sd [low, high]"; the seeds the figures come from are named in the first line."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = across_seeds(tables)
    csv_path = out / "seeds.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "column", "seeds", "mean", "sd", "low", "high"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in writer.fieldnames} for r in rows)
    columns = [(key, title) for key, title in SEED_COLUMNS if any(r["column"] == key for r in rows)]
    cell = {(r["method"], r["column"]): r for r in rows}

    def show(r: dict | None) -> str:
        if r is None:
            return ""
        spread = "" if math.isnan(r["sd"]) else f" ± {r['sd']:.3f}"
        return f"{r['mean']:.3f}{spread} [{r['low']:.3f}, {r['high']:.3f}]" + ("" if r["seeds"] == len(tables) else
                                                                              f" ({r['seeds']} seeds)")

    lines = [f"Across {len(tables)} training seeds ({', '.join(map(str, tables))}): mean ± sample standard deviation "
             "[lowest, highest] of each seed's test figure.", "",
             "| method | " + " | ".join(title for _, title in columns) + " |",
             "| --- |" + " --- |" * len(columns)]
    for method in dict.fromkeys(r["method"] for r in rows):
        lines.append(f"| {method} | " + " | ".join(show(cell.get((method, key))) for key, _ in columns) + " |")
    md_path = out / "seeds.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path
