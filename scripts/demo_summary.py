"""Print where the demo's checkpoints, test metrics and MLflow store are, and the test results."""

import argparse
import csv
from pathlib import Path

HEADS = {"softcam": "SoftCAM", "linear": "black box (GAP + linear)"}


def read_metrics(path: Path) -> dict[str, float]:
    with path.open() as f:
        return {row[0]: float(row[1]) for row in csv.reader(f) if len(row) == 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo", type=Path, required=True)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--backbone", default="resnet18")
    args = parser.parse_args()
    print("\n=== SoftCAM demo: test split ===")
    for head, title in HEADS.items():
        metrics_file = args.output_dir / f"{args.backbone}-{head}" / "test" / "metrics.csv"
        metrics = read_metrics(metrics_file) if metrics_file.is_file() else {}
        scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "no metrics (evaluation did not run)"
        print(f"{title:28s} {scores}")
        print(f"{'':28s} checkpoint   {args.demo / 'models' / head / 'model.pt'}")
        print(f"{'':28s} metrics      {metrics_file}")
        galleries = sorted((args.output_dir / f"{args.backbone}-{head}").glob("*/gallery"))  # one folder per run
        print(f"{'':28s} galleries    {galleries[-1] if galleries else 'none'}")
    comparison = args.output_dir / "comparison"
    if (comparison / "comparison.md").is_file():
        print(f"\nExplanation comparison (test split): {comparison}")
        print(f"{'':28s} comparison.csv / .md, claims.md, deletion_curves.png, box_accuracy.png, method_grid.png")
        print((comparison / "comparison.md").read_text())
        if (comparison / "claims.md").is_file():
            print((comparison / "claims.md").read_text())
    inference = args.demo / "inference"
    if (inference / "predictions.csv").is_file():
        print(f"\nSoftCAM inference over {args.demo / 'data' / 'images'}: {inference}")
        print(f"{'':28s} predictions.csv, maps/ (NIfTI), overlays/ (PNG), dicom/secondary_capture/")
    store = (args.output_dir / "mlflow.db").resolve()
    print(f"\nMLflow store: {store}")
    print(f"Open the MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///{store}")
    print("  then http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (MLflow 3's training views;"
          " how to read it: docs/README.md, Reviewing in MLflow)")


if __name__ == "__main__":
    main()
