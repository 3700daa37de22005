"""Sweep sparse SoftCAM's lambda1: test accuracy against localisation precision, as the SoftCAM paper
chose it. Trains one SoftCAM per value on the demo's data (``make demo`` first), scores each with the
comparison's metrics, and writes ``lambda_sweep.csv`` / ``.md`` under ``<demo>/eval/lambda_sweep``.

    python scripts/lambda_sweep.py --demo demo --lambda1 0 1e-4 1e-3 1e-2 -- --backbone resnet18
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=ROOT / "demo")
    parser.add_argument("--lambda1", nargs="+", default=["0", "1e-4", "1e-3", "1e-2"])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--demo_sparse_lambda1", type=float, default=1e-3, help="lambda1 of the demo's sparse SoftCAM")
    parser.add_argument("model", nargs=argparse.REMAINDER, help="after --: the bundle's model options")
    args = parser.parse_args()
    demo, model = args.demo.resolve(), [a for a in args.model if a != "--"]
    runs = {value: demo / "models" / "lambda_sweep" / f"lambda1-{value}" for value in args.lambda1}
    # the demo's dense and sparse SoftCAM are two points of the sweep already (same data, settings and seed)
    for value, trained in ((0.0, "softcam"), (args.demo_sparse_lambda1, "softcam-sparse")):
        for given in runs:
            if float(given) == value and (demo / "models" / trained / "model.pt").is_file():
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
        **overrides,
    )
    workflow.initialize()
    comparison = workflow.parser.get_parsed_content("comparison", instantiate=True)
    comparison.models = {f"lambda1 = {v}": {"head": "softcam", "checkpoint": str(d / "model.pt")} for v, d in runs.items()}
    comparison.contenders = [Contender(name, name, "softcam") for name in comparison.models]
    comparison.output_dir = demo / "eval" / "lambda_sweep"
    comparison.randomisation_images = 0
    rows = [row for row in comparison.run() if row["kind"] == "method"]  # not the ceiling and chance rows
    columns = ["lambda1", "accuracy", "auc", "activation_precision", "top_k_precision", "deletion_audc", "sign_consistency"]
    table = [{"lambda1": row["method"].split("= ")[1], **{c: row[c] for c in columns[1:]}} for row in rows]
    with open(comparison.output_dir / "lambda_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    lines = ["| " + " | ".join(columns) + " |", "| --- " * len(columns) + "|"]
    lines += ["| " + " | ".join(str(r[c]) if c == "lambda1" else f"{r[c]:.3f}" for c in columns) + " |" for r in table]
    (comparison.output_dir / "lambda_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
