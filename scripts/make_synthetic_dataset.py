"""Write the synthetic SoftCAM dataset (DICOM / NIfTI images, lesion masks, datalist.json)."""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.synthetic import make_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    parser.add_argument("--dims", type=int, default=2, choices=(2, 3), help="2: CR DICOM radiographs, 3: CT NIfTI")
    parser.add_argument("--n", type=int, default=800, help="number of cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", type=int, default=2, choices=(2, 3), help="2: lesion presence, 3: lesion type")
    parser.add_argument("--size", type=int, default=None, help="image rows (2D, default 256) or volume side (3D, 64)")
    parser.add_argument("--dicom-series", action="store_true", help="3D: also write each volume as a CT DICOM series")
    parser.add_argument("--lesion-size", type=float, default=1.0,
                        help="lesion radius relative to the default (2D: 2.2-3.5 %% of the rows, 3D: 2.5-4 voxels)")
    parser.add_argument("--lesion-contrast", type=float, default=1.0,
                        help="lesion intensity relative to the default; lower is harder (the distractors stay)")
    args = parser.parse_args()
    start = time.time()
    datalist = make_dataset(args.out, dims=args.dims, n=args.n, seed=args.seed, num_classes=args.classes, size=args.size,
                            dicom_series=args.dicom_series, lesion_size=args.lesion_size,
                            lesion_contrast=args.lesion_contrast)
    counts = {k: len(datalist[k]) for k in ("training", "validation", "test")}
    print(f"wrote {args.n} {args.dims}D cases to {args.out} in {time.time() - start:.0f}s: {counts}")


if __name__ == "__main__":
    main()
