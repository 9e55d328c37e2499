"""Chula RBC-12's point labels as the annotation table a user with point labels writes.

    python benchmarks/chula_csv.py ../shared/data/chula_rbc12 --out /tmp/chula/points.csv [--keep-elliptocytes]
    ipb preprocess --preset demo data.frames=../shared/data/chula_rbc12/Dataset \\
        data.annotations=/tmp/chula/points.csv data.point_box=64 data.catalog=/tmp/chula/catalog

The data set (../shared/data/README.md) ships one ``Label/N.txt`` per image ``Dataset/N.jpg``,
one cell a line: ``x y class`` (the cell's pixel centre and a class number). This writes
``frame,x,y,label`` rows with the class names, which ``ipb preprocess`` turns into one
``data.point_box`` square per cell (cells touch, so segmentation cannot find them one by one).

The elliptocytes (class 12) are left out by default: they were added later from 32
images of their own (707-738) that hold no other class, so the class is the same thing
as those slides' acquisition: a model can score on it by recognising the slides'
background, and every other class is scored on slides that never show it.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

CLASSES = ("normal", "macrocyte", "microcyte", "spherocyte", "target", "stomatocyte", "ovalocyte", "teardrop",
           "burr", "schistocyte", "uncategorised", "hypochromia", "elliptocyte")
ELLIPTOCYTE = 12


def rows(root: Path, keep_elliptocytes: bool = False) -> tuple[list[dict[str, object]], list[str]]:
    """The table's rows and the problems found (file and line named); a bad line is skipped."""
    labels = root / "Label"
    if not labels.is_dir():
        raise FileNotFoundError(f"{root} has no Label/ folder: point this at the chula_rbc12 folder")
    out: list[dict[str, object]] = []
    problems: list[str] = []
    for path in sorted(labels.glob("*.txt"), key=lambda p: (len(p.stem), p.stem)):
        frame = f"{path.stem}.jpg"
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            try:
                x, y, cls = (int(float(v)) for v in parts[:3])
                name = CLASSES[cls]
            except (ValueError, IndexError):
                problems.append(f"{path} line {n}: {line!r} is not 'x y class' with class 0..{len(CLASSES) - 1}")
                continue
            if cls == ELLIPTOCYTE and not keep_elliptocytes:
                continue
            out.append({"frame": frame, "x": x, "y": y, "label": name})
    return out, problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", help="the chula_rbc12 folder (Dataset/, Label/)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--keep-elliptocytes", action="store_true", help="keep class 12 (see the module docstring)")
    args = ap.parse_args(argv)
    table, problems = rows(Path(args.root), args.keep_elliptocytes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["frame", "x", "y", "label"])
        writer.writeheader()
        writer.writerows(table)
    for p in problems:
        print(p, file=sys.stderr)
    counts: dict[str, int] = {}
    for r in table:
        counts[str(r["label"])] = counts.get(str(r["label"]), 0) + 1
    print(f"{len(table)} points in {len({r['frame'] for r in table})} frames -> {out}: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
