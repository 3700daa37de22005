"""Mean and spread across training seeds of the comparison's claim columns (``make demo-full``).

    python scripts/seed_summary.py --out demo-full/eval/seeds demo-full/seed-0 demo-full/seed-1 demo-full/seed-2

Each argument is one seed's demo folder; its table is ``<folder>/eval/comparison/comparison.csv``.
Writes ``seeds.csv`` and ``seeds.md`` to ``--out`` and prints the Markdown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bundle.explain.seeds import read_comparison, write_seed_summary  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("runs", type=Path, nargs="+", help="one demo folder per seed")
    args = parser.parse_args()
    tables = {}
    for run in args.runs:
        table = run / "eval" / "comparison" / "comparison.csv"
        if not table.is_file():
            sys.exit(f"seed summary: {table} not found (did that seed's comparison run?)")
        tables[run.name] = read_comparison(table)
    _, md = write_seed_summary(args.out, tables)
    print(md.read_text())


if __name__ == "__main__":
    main()
