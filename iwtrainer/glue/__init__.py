"""The run_glue.py-compatible application (``run_glue_iw.py``, console command ``iwtrainer-glue``).

- ``arguments.py``: the argument dataclasses, one parser, config files
- ``tasks.py``: the GLUE task table (columns, labels, each task's metric); ``tsv.py``: the offline TSV reader
- ``data.py``: loading, selecting and tokenizing splits; labels, metrics and the collator
- ``modeling.py``: loading the model and tokenizer
- ``run.py``: :func:`main` — prepare, train, evaluate, predict, write the outputs
- ``search.py``: ``--hpo_trials``: a hyperparameter search over the prepared run
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    """``iwtrainer-glue`` / ``run_glue_iw.py``: see :func:`iwtrainer.glue.run.main`."""
    from .run import main as run_main

    run_main(argv)
