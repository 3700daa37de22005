"""Make datalist.json from a PACS export (a folder of DICOM and NIfTI) and a CSV of labels.

Images: DICOM files, DICOM series folders (--spatial_dims 3: a folder holding one series' files),
multi-frame DICOM files (3D) and NIfTI files, anywhere under --images. Each CSV row names images
by one key (see --key) and gives a label: a class index, or a class name listed in --classes.
Splits keep each patient's images together (DICOM PatientID, or the CSV's patient column; a
NIfTI file without one is a group of its own) and keep label proportions where groups allow;
the same inputs and --seed give the same split. Every CSV row that matches no image, every image
no row labels, every file that cannot be an entry and every unmatched mask is reported on
stderr by CSV row number or by path, never by an identifier. The datalist check that training
runs (bundle.data.load_datalist) then runs on the result.

Exit status: 0 all matched, 2 written but something was reported, 1 nothing usable or the check failed.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.data import SPLITS, DatalistError, load_datalist  # noqa: E402
from bundle.datalist_builder import build_datalist, datalist_json  # noqa: E402
from bundle.label_table import KEYS, LabelTableError, read_label_table  # noqa: E402
from bundle.pacs.protocol import write_durably  # noqa: E402
from bundle.splits import parse_proportions  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, type=Path, help="the exported images folder (walked recursively)")
    parser.add_argument("--labels", required=True, type=Path, help="CSV (',' ';' or tab separated) with a key and a label column")
    parser.add_argument("--masks", type=Path, help="folder of lesion masks (NIfTI or DICOM). A mask matches an image by, in "
                        "order: its path relative to --masks without suffix = the image's relative path without suffix "
                        "(a series: its folder); its file name = the image's SOP Instance UID (files) or Series Instance "
                        "UID (series, multi-frame files); its file name = the image's file or folder name, without suffixes")
    parser.add_argument("--split", default="70/15/15", help="training/validation/test proportions (default 70/15/15)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument("--out", type=Path, help="datalist file to write (default: datalist.json beside --images); entry "
                        "paths are relative to its folder, the --dataset_dir of training")
    parser.add_argument("--spatial_dims", type=int, default=2, choices=(2, 3),
                        help="2: one entry per single-frame DICOM or NIfTI file; 3: DICOM series folders, multi-frame "
                        "DICOM files and NIfTI volumes (default 2)")
    parser.add_argument("--key", default="auto", choices=["auto", *KEYS],
                        help="what the CSV names images by: path (relative to --images; a series: its folder), sop, "
                        "series or study (Instance UID) or accession (number); a series, study or accession row labels "
                        "all of its images. auto (default): the first of path, SOPInstanceUID, SeriesInstanceUID, "
                        "StudyInstanceUID, AccessionNumber the header has (case, spaces and '_' ignored)")
    parser.add_argument("--key_column", help="the key's column when it has another name")
    parser.add_argument("--label_column", help="default: a column named label, class or target")
    parser.add_argument("--patient_column", help="patient of each row, to group images without a DICOM PatientID "
                        "(default: a column named patient or PatientID, if any)")
    parser.add_argument("--classes", help="class names in index order, comma-separated, when labels are names")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    out = (args.out or args.images.resolve().parent / "datalist.json").resolve()
    try:
        proportions = parse_proportions(args.split)
        if not args.images.is_dir():
            raise LabelTableError(f"images folder not found: {args.images}")
        table = read_label_table(args.labels, args.key, args.key_column, args.label_column, args.patient_column, classes)
    except (LabelTableError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"labels keyed by {KEYS[table.key_kind][0]} (column {table.key_column!r})")
    build = build_datalist(args.images, table, out.parent, table_name=args.labels.name, masks_dir=args.masks,
                           spatial_dims=args.spatial_dims, proportions=proportions, seed=args.seed,
                           exclude=(args.labels, out))
    for finding in build.findings:
        print(finding, file=sys.stderr)
    for line in build.summary:
        print(line)
    if build.findings:
        print(f"{len(build.findings)} rows, images or masks could not be used: listed on stderr")
    if not any(build.datalist[s] for s in SPLITS):
        print("error: no image was labelled; nothing written", file=sys.stderr)
        return 1
    write_durably(out, datalist_json(build, classes).encode())  # whole file or none
    print(f"wrote {out}")
    try:
        checked = load_datalist(out.parent, out.name, num_classes=len(classes) if classes else None)
    except DatalistError as err:
        print(f"datalist check failed: {err}", file=sys.stderr)
        return 1
    print("datalist check passed: " + ", ".join(f"{s} {len(checked[s])}" for s in SPLITS)
          + (f"; train with --dataset_dir {out.parent}" if out.name == "datalist.json" else ""))
    return 2 if build.findings else 0


if __name__ == "__main__":
    sys.exit(main())
