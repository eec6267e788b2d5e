"""Write two CSV files to try the ``custom`` scenario with (``configs/demo_custom.yaml``), as stand-ins for your own.

They are cut from two packaged corpora: ``reviews.csv`` from Rotten Tomatoes (fresh / rotten) and ``news.csv``
from BBC News (5 topics), each with a ``text`` and a ``label`` column, train and test rows together (the config
holds a seeded fraction out). Existing files are left alone unless ``--force`` is given.

    python scripts/demo_data.py                  # -> data/demo/reviews.csv, data/demo/news.csv
    fltac run --config configs/demo_custom.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from fltac.data.text5 import load_bbc, load_rotten


def task_frame(task) -> pd.DataFrame:
    """All rows of a packaged task as a two-column table: ``text`` and its ``label`` name."""
    labels = [task.labels[i] for i in [*task.train_labels, *task.test_labels]]
    return pd.DataFrame({"text": task.train_texts + task.test_texts, "label": labels})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"),
                        help="folder for the CSVs (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace CSVs that are already there")
    args = parser.parse_args(argv)
    files = {"reviews.csv": load_rotten, "news.csv": load_bbc}
    present = [name for name in files if (args.out / name).exists()]
    if present and not args.force:
        print(f"demo_data: {', '.join(str(args.out / n) for n in present)} already exist(s); --force replaces them",
              file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for name, load in files.items():
        frame = task_frame(load(0.2, 0))
        frame.to_csv(args.out / name, index=False)
        print(f"wrote {args.out / name}: {len(frame)} rows, labels {sorted(frame['label'].unique())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
