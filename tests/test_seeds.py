import csv
import math
import statistics

import pytest

from bundle.explain.seeds import across_seeds, read_comparison, write_seed_summary


def _table(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "kind", "auc", "activation_precision"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_mean_and_spread_are_those_of_the_seeds_figures(tmp_path):
    values = {"seed-0": 0.20, "seed-1": 0.26, "seed-2": 0.23}
    tables = {}
    for seed, precision in values.items():
        rows = [{"method": "sparse SoftCAM", "kind": "method", "auc": 0.9, "activation_precision": precision},
                {"method": "ideal map at 16x16", "kind": "ideal", "auc": "", "activation_precision": 0.58}]
        tables[seed] = read_comparison(_table(tmp_path / f"{seed}.csv", rows))
    assert list(tables["seed-0"]) == ["sparse SoftCAM"]  # reference rows are not trained: no seed spread
    row = next(r for r in across_seeds(tables) if r["column"] == "activation_precision")
    assert row["seeds"] == 3
    assert row["mean"] == pytest.approx(statistics.fmean(values.values()))
    assert row["sd"] == pytest.approx(statistics.stdev(values.values()))
    assert (row["low"], row["high"]) == (0.20, 0.26)
    auc = next(r for r in across_seeds(tables) if r["column"] == "auc")
    assert auc["sd"] == pytest.approx(0.0, abs=1e-12)
    _, md = write_seed_summary(tmp_path / "out", tables)
    text = md.read_text()
    assert "Across 3 training seeds (seed-0, seed-1, seed-2)" in text
    assert f"{row['mean']:.3f} ± {row['sd']:.3f} [0.200, 0.260]" in text


def test_a_method_missing_from_a_seed_says_on_how_many_seeds_it_rests(tmp_path):
    tables = {"a": {"m": {"auc": 0.9, "activation_precision": math.nan}}, "b": {}}
    rows = across_seeds(tables)
    assert [(r["column"], r["seeds"]) for r in rows] == [("auc", 1)]
    assert math.isnan(rows[0]["sd"])
    _, md = write_seed_summary(tmp_path, tables)
    assert "| m | 0.900 [0.900, 0.900] (1 seeds) |" in md.read_text()
