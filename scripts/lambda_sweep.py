"""Sweep sparse SoftCAM's lambda1: accuracy against localisation precision, as the SoftCAM paper
chose it, on the annotated **validation** images (the test split stays for the final report).

Trains one SoftCAM per value on the demo's data (``make demo`` first: lambda1 = 0 and the demo's
sparse value reuse its models), scores each on the validation split with the comparison's metrics,
writes ``lambda_sweep.csv`` / ``.md`` under ``<demo>/eval/lambda_sweep`` and names the sparse model's
value: the lambda1 > 0 with the highest activation precision among those whose validation AUC is
no more than ``--auc_tolerance`` below dense SoftCAM's (lambda1 = 0). lambda1 is per map element
(``bundle.losses.evidence_penalty``), so a value carries across input sizes and output strides.

    python scripts/lambda_sweep.py --demo demo --lambda1 0 1e-3 1e-2 1e-1 -- --backbone resnet18 --output_stride 8
"""

from __future__ import annotations

import argparse
import ast
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLUMNS = ["lambda1", "accuracy", "auc", "activation_precision", "top_k_precision", "pxap", "deletion_audc",
           "sign_consistency"]


def train(demo: Path, lambda1: str, epochs: int, model: list[str], ckpt_dir: Path) -> None:
    if (ckpt_dir / "model.pt").is_file():
        print(f"lambda1 = {lambda1}: {ckpt_dir / 'model.pt'} exists, not trained again", flush=True)
        return
    command = [sys.executable, "-m", "monai.bundle", "run", "--meta_file", "configs/metadata.json",
               "--logging_file", "configs/logging.conf", "--config_file", "configs/train.json",
               "--dataset_dir", str(demo / "data"), "--output_dir", str(demo / "eval"), "--ckpt_dir", str(ckpt_dir),
               "--head", "softcam", "--lambda1", lambda1, "--max_epochs", str(epochs),
               "--model_name", f"softcam-lambda1-{lambda1}", *model]
    subprocess.run(command, cwd=ROOT, check=True)


def _literal(value: str):
    """A command-line value as ``monai.bundle run`` (python-fire) reads it: a Python literal, else text."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def choose(table: list[dict], auc_tolerance: float) -> dict:
    """The paper's trade-off as a rule, for the sparse model (lambda1 > 0): the most precise evidence
    (activation precision) among the values whose validation AUC is no more than ``auc_tolerance``
    below dense SoftCAM's; if none is, the value with the highest AUC. Ties go to the smaller lambda1."""
    sparse = [r for r in table if float(r["lambda1"]) > 0]
    if not sparse:
        raise ValueError("the sweep has no lambda1 > 0 to choose the sparse model from")
    dense = next((r for r in table if float(r["lambda1"]) == 0.0), None)
    floor = (dense["auc"] if dense else max(r["auc"] for r in sparse)) - auc_tolerance
    kept = [r for r in sparse if r["auc"] >= floor]
    if not kept:
        return max(sparse, key=lambda r: (r["auc"], -float(r["lambda1"])))
    return max(kept, key=lambda r: (r["activation_precision"], -float(r["lambda1"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=ROOT / "demo")
    parser.add_argument("--lambda1", nargs="+", default=["0", "1e-3", "1e-2", "1e-1"])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--demo_sparse_lambda1", type=float, default=None, help="lambda1 of the demo's sparse SoftCAM")
    parser.add_argument("--auc_tolerance", type=float, default=0.01,
                        help="how much validation AUC below dense SoftCAM's a sparse value may lose")
    parser.add_argument("model", nargs=argparse.REMAINDER, help="after --: the bundle's model options")
    args = parser.parse_args()
    demo, model = args.demo.resolve(), [a for a in args.model if a != "--"]
    runs = {value: demo / "models" / "lambda_sweep" / f"lambda1-{value}" for value in args.lambda1}
    # the demo's dense and sparse SoftCAM are two points of the sweep already (same data, settings and seed)
    for value, trained in ((0.0, "softcam"), (args.demo_sparse_lambda1, "softcam-sparse")):
        for given in runs:
            if value is not None and float(given) == value and (demo / "models" / trained / "model.pt").is_file():
                runs[given] = demo / "models" / trained
    for value, ckpt_dir in runs.items():
        train(demo, value, args.epochs, model, ckpt_dir)

    from monai.bundle import ConfigWorkflow

    from bundle.explain.compare import Contender

    overrides = {key.lstrip("-"): _literal(value) for key, value in zip(model[::2], model[1::2])}
    workflow = ConfigWorkflow(
        config_file=[str(ROOT / "configs/train.json"), str(ROOT / "configs/compare.json")],
        meta_file=str(ROOT / "configs/metadata.json"), workflow_type="infer", bundle_root=str(ROOT),
        dataset_dir=str(demo / "data"), output_dir=str(demo / "eval"), comparison_tracking=None,
        **{"test_set#items": "$@datalist['validation']"}, **overrides,
    )
    workflow.initialize()
    comparison = workflow.parser.get_parsed_content("comparison", instantiate=True)
    comparison.models = {f"lambda1 = {v}": {"head": "softcam", "checkpoint": str(d / "model.pt")} for v, d in runs.items()}
    comparison.contenders = [Contender(name, name, "softcam") for name in comparison.models]
    comparison.output_dir = demo / "eval" / "lambda_sweep"
    comparison.randomisation_images = 0
    rows = [row for row in comparison.run() if row["kind"] == "method"]  # not the ceiling and chance rows
    columns = [c for c in COLUMNS if c == "lambda1" or c in rows[0]]
    table = [{"lambda1": row["method"].split("= ")[1], **{c: row[c] for c in columns[1:]}} for row in rows]
    chosen = choose(table, args.auc_tolerance)
    with open(comparison.output_dir / "lambda_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    lines = ["| " + " | ".join(columns) + " |", "| --- " * len(columns) + "|"]
    lines += ["| " + " | ".join(str(r[c]) if c == "lambda1" else f"{r[c]:.3f}" for c in columns) + " |" for r in table]
    lines += ["", f"Validation split. Chosen for sparse SoftCAM: lambda1 = {chosen['lambda1']} (rule: the highest "
                  f"activation precision among the lambda1 > 0 whose validation AUC is no more than {args.auc_tolerance} below "
                  "dense SoftCAM's)."]
    (comparison.output_dir / "lambda_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
