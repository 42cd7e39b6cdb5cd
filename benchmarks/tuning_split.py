"""Carve a tuning split out of each GLUE task's TRAINING set, so hyperparameters are chosen without the dev set.

For each task the data lines of ``<src>/<Folder>/train.tsv`` (every line but the header; CoLA's train.tsv has no
header, so all its lines are data) are shuffled by index with ``random.Random(seed)``; the first
``round(fraction * n)`` shuffled indices are held out. ``<out>/<Folder>/dev.tsv`` gets the held-out lines and
``train.tsv`` the others, each in the source file's order, the header (if any) kept on both. The real dev sets are
never read.

A task with a row limit (``--max_rows``, default ``sst2=10000``: SST-2's 67k rows would make every tuning run as long
as a dev run) is split from a subsample: the first ``limit`` shuffled indices, of which the first
``round(fraction * limit)`` are held out and the rest kept. Without a limit the pool is every row, as before.

    python benchmarks/tuning_split.py --src ../shared/data/glue --out .gpu/tune_glue   # writes a manifest too
    python benchmarks/tuning_split.py --tasks sst2 --out .gpu/tune_glue   # adds SST-2 to the same manifest
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

FOLDERS = {"rte": "RTE", "mrpc": "MRPC", "stsb": "STS-B", "cola": "CoLA", "sst2": "SST-2"}
HEADERLESS = {"cola"}  # CoLA train/dev have no header row
SEED = 0
FRACTION = 0.15
MAX_ROWS = {"sst2": 10_000}


def split_lines(lines: list[str], fraction: float, seed: int, limit: int | None = None) -> tuple[list[str], list[str]]:
    """(kept, held_out): a deterministic ``fraction`` of ``lines`` (of a ``limit``-row subsample, if given) held out,
    both in the original order."""
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    pool = order[:limit] if limit is not None else order
    n_held = round(fraction * len(pool))
    held, kept = set(pool[:n_held]), set(pool[n_held:])
    return [x for i, x in enumerate(lines) if i in kept], [x for i, x in enumerate(lines) if i in held]


def make_split(
    src: Path, out: Path, task: str, fraction: float = FRACTION, seed: int = SEED, limit: int | None = None
) -> dict:
    """Write ``out/<Folder>/{train,dev}.tsv`` for ``task``; returns the row counts and the files' sha256."""
    folder = FOLDERS[task]
    text = (src / folder / "train.tsv").read_text(encoding="utf-8")
    lines = [line for line in text.split("\n") if line.strip()]  # blank lines are no rows (the reader skips them)
    header = [] if task in HEADERLESS else lines[:1]
    data = lines[len(header) :]
    kept, held = split_lines(data, fraction, seed, limit)
    (out / folder).mkdir(parents=True, exist_ok=True)
    info: dict = {"folder": folder, "source_rows": len(data), "train_rows": len(kept), "heldout_rows": len(held)}
    if limit is not None and limit < len(data):
        info["subsample_rows"] = limit
    for name, rows in (("train.tsv", kept), ("dev.tsv", held)):
        body = "\n".join(header + rows) + "\n"
        (out / folder / name).write_text(body, encoding="utf-8")
        info[f"{name}_sha256"] = hashlib.sha256(body.encode()).hexdigest()
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default="../shared/data/glue", help="GLUE folder with the original train.tsv files")
    p.add_argument("--out", default=".gpu/tune_glue")
    p.add_argument("--tasks", default="rte,mrpc,stsb,cola")
    p.add_argument("--fraction", type=float, default=FRACTION)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--max_rows", default=",".join(f"{t}={n}" for t, n in MAX_ROWS.items()),
                   help="TASK=N,...: split a task from a subsample of N shuffled rows (empty: no limit)")  # fmt: skip
    args = p.parse_args()
    try:
        limits = {t: int(n) for t, n in (x.split("=") for x in args.max_rows.split(",") if x)}
    except ValueError:
        p.error(f"--max_rows takes TASK=N pairs separated by commas, got {args.max_rows!r}")
    unknown = [t for t in [*args.tasks.split(","), *limits] if t not in FOLDERS]
    if unknown:
        p.error(f"unknown task {unknown[0]!r}: expected one of {', '.join(FOLDERS)}")
    out = Path(args.out)
    manifest_path = out / "split.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"tasks": {}}
    if manifest["tasks"] and (manifest.get("seed"), manifest.get("fraction")) != (args.seed, args.fraction):
        p.error(f"{manifest_path} was written with another --seed/--fraction: use a new --out")
    manifest.update(
        rule="random.Random(seed).shuffle of the data-line indices of train.tsv; the first round(fraction*n) "
        "are dev.tsv, the rest train.tsv, both in source order, header kept (CoLA: none); with a row limit, "
        "n = limit and only the first limit shuffled indices are used",
        seed=args.seed,
        fraction=args.fraction,
    )
    for t in args.tasks.split(","):
        manifest["tasks"][t] = make_split(Path(args.src), out, t, args.fraction, args.seed, limits.get(t))
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
