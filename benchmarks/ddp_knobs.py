"""``run_glue_iw.py`` with two DistributedDataParallel knobs that the Trainer has no flag for: does DDP's own host work
make a compiled 2-process step host-bound?

    python benchmarks/ddp_knobs.py [--optimize_ddp {true,false}] [--gradient_as_bucket_view] -- <run_glue_iw.py flags>
    accelerate launch --num_processes 2 --multi_gpu benchmarks/ddp_knobs.py --optimize_ddp false \\
        --gradient_as_bucket_view -- <flags>

Why: profiled, a 2-process step of all-mpnet-base-v2 compiled with ``reduce-overhead`` (and the sync-free recipe)
is host-bound, and most of the host's extra work a step is DDP's (SPEED.md, ``profile_ddp/``). Two of its levers are
no TrainingArguments flag (``--ddp_static_graph``, ``--ddp_broadcast_buffers`` and ``--ddp_bucket_cap_mb`` are:
``bench_ddp``'s ``lean`` variant), so this wrapper sets them and runs run_glue_iw.py unchanged, in the same process
(``bench_ddp``'s ``onegraph`` variant):

- ``--optimize_ddp false``: ``torch._dynamo.config.optimize_ddp``. By default dynamo splits a compiled DDP model into
  one graph per DDP gradient bucket, so that each bucket's all-reduce can start while the backward goes on. DDP's
  first bucket is 1 MiB (``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``): mpnet's 3.6 MB of LoRA and head
  gradients make 2 buckets, so 2 graphs forward and backward, 4 CUDA-graph launches a step and 2 all-reduces. With
  ``false`` the model is one graph and the all-reduce starts after the whole backward (a 3.6 MB all-reduce has
  little to overlap with).
- ``--gradient_as_bucket_view``: DDP's ``gradient_as_bucket_view=True``. The gradients become views into DDP's
  buckets, so after the all-reduce the reducer does not copy each of the 148 trainable gradients back out of its
  bucket (``copy_bucket_to_grad``). The copy into the bucket stays: the Trainer's ``model.zero_grad()`` sets every
  gradient to None, so each backward writes fresh gradients that the reducer copies into the bucket. The Trainer
  builds its ``DistributedDataParallelKwargs`` (accelerate's) from ``transformers.trainer``'s namespace (transformers
  5.17 and 5.24): the wrapper swaps that name for a factory that adds ``gradient_as_bucket_view=True`` (a subclass
  with that default would be lost: accelerate passes DDP only the fields that differ from the class's defaults), and
  checks the Trainer's accelerator got it; a transformers that builds DDP's arguments another way ends the run with
  one line rather than running without the knob.

Neither knob changes the arithmetic: the same run with and without them logs the same losses. Rank 0 prints one line
naming the knobs applied; both are restored when run_glue_iw returns.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import iwtrainer.glue.run as run  # noqa: E402

PROG = Path(__file__).name


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--optimize_ddp",
        choices=("true", "false"),
        help="torch._dynamo.config.optimize_ddp (false: one compiled graph, not one per DDP bucket; default: "
        "dynamo's own, true)",
    )
    p.add_argument(
        "--gradient_as_bucket_view",
        action="store_true",
        help="DDP's gradient_as_bucket_view=True (gradients are views into DDP's buckets)",
    )
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The wrapper's own flags (before ``--``) and run_glue_iw.py's (after it); bad flags exit 2 with one line."""
    p = parser()
    if "--" not in argv:
        p.error("expected `-- <run_glue_iw.py flags>` after the knobs' own flags")
    split = argv.index("--")
    return p.parse_args(argv[:split]), argv[split + 1 :]


def describe(args: argparse.Namespace) -> str:
    knobs = []
    if args.optimize_ddp is not None:
        knobs.append(f"torch._dynamo.config.optimize_ddp = {args.optimize_ddp == 'true'}")
    if args.gradient_as_bucket_view:
        knobs.append("DDP gradient_as_bucket_view = True")
    return f"{PROG}: " + ("; ".join(knobs) if knobs else "no knob applied (run_glue_iw.py as it is)")


@contextlib.contextmanager
def knobs(args: argparse.Namespace) -> Iterator[None]:
    """Sets the knobs that ``args`` asks for while the block runs, and restores what was there after it.
    ``--gradient_as_bucket_view`` needs ``transformers.trainer.DistributedDataParallelKwargs`` (SystemExit with one
    line without it) and makes every Trainer built in the block check that its accelerator passes DDP the knob."""
    import torch._dynamo
    import transformers.trainer

    with contextlib.ExitStack() as undo:
        if args.optimize_ddp is not None:
            undo.callback(setattr, torch._dynamo.config, "optimize_ddp", torch._dynamo.config.optimize_ddp)
            torch._dynamo.config.optimize_ddp = args.optimize_ddp == "true"
        if args.gradient_as_bucket_view:
            ddp_kwargs = getattr(transformers.trainer, "DistributedDataParallelKwargs", None)
            if ddp_kwargs is None:
                sys.exit(
                    f"{PROG}: error: transformers {transformers.__version__} has no "
                    "transformers.trainer.DistributedDataParallelKwargs: --gradient_as_bucket_view cannot be set"
                )
            undo.callback(setattr, transformers.trainer, "DistributedDataParallelKwargs", ddp_kwargs)
            # a factory, not a subclass: to_kwargs() drops the fields equal to the class's defaults
            transformers.trainer.DistributedDataParallelKwargs = functools.partial(
                ddp_kwargs, gradient_as_bucket_view=True
            )
            original = run.GlueTrainer

            class Checked(original):
                def __init__(self, *a, **kw):
                    super().__init__(*a, **kw)
                    handler = self.accelerator.ddp_handler
                    if handler is None or handler.to_kwargs().get("gradient_as_bucket_view") is not True:
                        sys.exit(
                            f"{PROG}: error: the Trainer's accelerator does not pass gradient_as_bucket_view=True "
                            f"to DDP (transformers {transformers.__version__} builds DDP's arguments another way)"
                        )

            undo.callback(setattr, run, "GlueTrainer", original)
            run.GlueTrainer = Checked
        yield


def main(argv: list[str] | None = None) -> None:
    args, run_argv = parse(sys.argv[1:] if argv is None else argv)
    if os.environ.get("RANK", "0") == "0":
        print(describe(args), flush=True)
    with knobs(args):
        run.main(run_argv)


if __name__ == "__main__":
    main()
