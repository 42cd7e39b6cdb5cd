"""1 GPU vs N GPUs, through ``accelerate launch run_glue_iw.py`` (``torchrun`` with gloo under ``--cpu``): at the same
global batch, same sensitivities? matching loss curves? how much faster? At the same per-device batch (the way GPUs
are usually added), how close to N× the samples/s?

Each pair trains one GLUE task twice, on 1 process and on N processes (same seed, same steps), with IW-LoRA (``sum``,
α=1e-4, r=8) and, with ``--methods iw,lora``, again with plain LoRA (``--iw_alpha 0``: no calibration, no
penalty). A pair's batch is either the *global* batch B (default: 1 process trains batch B, N processes B/N each) or,
with the ``per_device`` tag, the *per-device* batch B (1 process trains batch B, N processes B each: N× the global
batch and N× the samples per step). Global pairs compare the two runs' calibrated sensitivities (relative difference,
Spearman of the ranking, coefficient difference), their logged loss curves and final dev metric; per-device pairs
report the throughput ratios (samples/s N ÷ samples/s 1, ideally N) and the sensitivity Spearman only as information
(different global batches: the sensitivities need not agree). Throughput is measured three ways: samples/s of the
whole ``train()`` (what run_glue reports, calibration and compile included), of the steps alone (calibration time
taken out) and *steady* (from the 2nd to the last logged step, timed by the arrival of rank 0's log lines: compile
warm-up and calibration left out; needs at least 3 logged steps). ``--torch_compile MODE[,MODE...]`` runs every pair
and method once per mode (``none`` = eager; else the Trainer's ``--torch_compile true --torch_compile_mode MODE`` in
both runs). Runs are sequential, so timings never overlap. ``--variants plain,nosync`` runs every pair, mode and
method twice, side by side: as it is and with the sync-free recipe ``SYNC_FREE_FLAGS`` (``--logging_nan_inf_filter
false --accelerator_config '{"non_blocking": true}'`` appended to run_glue_iw's command line: no host read of each
step's loss, batches copied to the GPU without a stream synchronise; bench_run's ``+nosync``), and adds a table of
nosync ÷ plain samples/s for the 1- and the N-process run; ``--variants nosync`` runs the recipe alone. Two more
variants try DDP's own levers, for a compiled 2-process step that is host-bound by DDP's per-parameter work:
``lean`` adds ``--ddp_static_graph true --ddp_broadcast_buffers false --ddp_bucket_cap_mb 32`` to the recipe
(TrainingArguments flags);
``onegraph`` runs lean's command line through ``benchmarks/ddp_knobs.py --optimize_ddp false
--gradient_as_bucket_view --`` (two knobs the Trainer has no flag for: one compiled graph instead of one per DDP
gradient bucket, gradients as views into DDP's buckets). Every variant is defined once, in ``DDP_VARIANTS`` (its
flags) and ``WRAPPERS``; without plain, the table compares each variant with the first listed
(``--variants nosync,lean,onegraph``: lean and onegraph ÷ nosync).

Run order and repeats: by default each method's 1-process run is followed by its N-process run, method after method
(``--methods lora,iw`` puts LoRA first). ``--repeats R`` launches every run R times; ``--order alternate`` makes
each repeat one round of every method (× variant) × process count, the round's order reversed every other round
(R = 2 with ``--methods lora,iw``: lora 1, lora N, iw 1, iw N, then iw N, iw 1, lora N, lora 1), so that a slow first
run on a fresh machine and a real per-method cost can be told apart: each rate in the tables is then the median over
the repeats, and a last table lists every run in launch order with its steady ms/step and calibration ms/batch.

    python benchmarks/bench_ddp.py --model MINILM_DIR --glue_dir GLUE_DIR --nproc 2 --out benchmarks/results/ddp
    python benchmarks/bench_ddp.py ... --deberta_shapes --calib_steps 50 --pairs bf16:32:150,bf16:128:60 \\
        --max_train_samples 20000 --out benchmarks/results/ddp_deberta
    python benchmarks/bench_ddp.py ... --pairs bf16:32:400:per_device --methods iw,lora --torch_compile none,default \\
        --calib_steps 50 --logging_steps 20 --out benchmarks/results/ddp_per_device
    python benchmarks/bench_ddp.py ... --pairs bf16:32:300:per_device --methods lora,iw --repeats 2 \\
        --order alternate --calib_steps 50 --logging_steps 20 --out benchmarks/results/ddp_per_device_order
    python benchmarks/bench_ddp.py ... --pairs bf16:32:300:per_device --methods lora --torch_compile reduce-overhead \\
        --variants plain,nosync --calib_steps 50 --logging_steps 20 --out benchmarks/results/ddp_per_device_nosync
    python benchmarks/bench_ddp.py ... --pairs bf16:32:300:per_device --methods lora --torch_compile reduce-overhead \\
        --variants nosync,lean,onegraph --calib_steps 50 --logging_steps 20 --out benchmarks/results/ddp_knobs
    python benchmarks/bench_ddp.py ... --cpu --pairs fp32:8:6:nodrop --max_train_samples 256   # CPU smoke test

Pairs are ``PRECISION:BATCH:STEPS[:nodrop][:per_device]`` (tags in any order): fp32 shows the equivalence without
bf16 round-off; ``nodrop`` turns every dropout off (encoder config and LoRA), so the two runs of a global pair see
the same samples through the same function and their loss curves must agree to float round-off (with dropout, each
rank draws its own masks: the curves agree only statistically); bf16 at batch 32 is the GLUE grid's setting; bf16 at
a larger batch tests whether more work per GPU lets data parallelism pay off; ``per_device`` makes BATCH the
per-device batch (a global BATCH must be divisible by ``--nproc``). The 1-process run sees one GPU
(``CUDA_VISIBLE_DEVICES``), else the Trainer would wrap the model in ``nn.DataParallel`` over all of them and double
its batch. Compiled runs: keep STEPS × the N-process global batch within the training rows (no short last batch of
an epoch, which would recompile mid-run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from iwtrainer.glue.tasks import objective_metric  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
DEFAULT_PAIRS = "fp32:32:200:nodrop,bf16:32:400,bf16:256:150"
PAIR_FORMAT = "PRECISION:BATCH:STEPS[:nodrop][:per_device]"
PAIR_TAGS = ("nodrop", "per_device")
METHODS = {"iw": "IW-LoRA", "lora": "LoRA"}
"""``--methods`` values and their names in the markdown: ``lora`` is the same run with ``--iw_alpha 0``."""
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``--torch_compile`` values: ``none`` = eager, the others torch.compile's modes."""
SYNC_FREE_FLAGS = ("--logging_nan_inf_filter", "false", "--accelerator_config", '{"non_blocking": true}')
"""The sync-free recipe, the one place that defines it (bench_run's ``+nosync`` configurations reuse it): the Trainer
then neither reads each step's loss on the host (its NaN/inf filter: ``torch.isnan(tr_loss_step)``, a host sync per
step) nor copies each batch to the GPU with ``non_blocking=False`` (accelerate's default: a stream synchronise per
step; non-blocking needs the pinned batches of ``--dataloader_pin_memory true``, the Trainer's default on GPUs).
A non-finite loss still stops the run: iwtrainer's DivergenceGuard checks on the device."""
VARIANTS = {"plain": (), "nosync": SYNC_FREE_FLAGS}
"""The variants that mean something in one process too, and their extra run_glue_iw flags (``plain``: none;
``nosync``: the sync-free recipe): bench_run's ``+nosync`` reads this table."""
LEAN_DDP_FLAGS = ("--ddp_static_graph", "true", "--ddp_broadcast_buffers", "false", "--ddp_bucket_cap_mb", "32")
"""The DDP settings a Trainer user can pass today: DDP told the graph is static, no broadcast of the model's buffers
from rank 0 before each forward (a collective and a host walk over the buffers a step), and one gradient bucket: a
bucket cap given explicitly replaces DDP's 1 MiB first bucket (read in torch 2.13's ``_BucketCapacityConfig``; on the
GPU machine's 2.11 a profile's all-reduces a step will tell), so mpnet's 3.6 MB of LoRA and head gradients take one
all-reduce a step, not two. 32 MB, not DDP's default 25: accelerate hands DDP only the values that differ from its
own defaults, and 25 is one of them, so 25 would leave the first bucket as it is."""
DDP_VARIANTS = {
    **VARIANTS,
    "lean": (*SYNC_FREE_FLAGS, *LEAN_DDP_FLAGS),
    "onegraph": (*SYNC_FREE_FLAGS, *LEAN_DDP_FLAGS),
}
"""``--variants`` values: the extra run_glue_iw flags of each, the one place that defines them (``lean``: the
sync-free recipe and ``LEAN_DDP_FLAGS``; ``onegraph``: the same flags, run through ``WRAPPERS``' knobs)."""
WRAPPERS = {"onegraph": ("benchmarks/ddp_knobs.py", "--optimize_ddp", "false", "--gradient_as_bucket_view")}
"""The variants run through a wrapper of run_glue_iw.py: the wrapper (from the repository root) and its flags, which
replace run_glue_iw.py in the command, followed by ``--`` and run_glue_iw's flags (``onegraph``: ddp_knobs.py sets
two DDP knobs the Trainer has no flag for: one compiled graph, not one per DDP bucket, and gradients as views into
DDP's buckets)."""
VARIANT_NOTES = {
    "nosync": (
        "the sync-free recipe",
        "no host read of each step's loss for the NaN/inf filter, batches copied to the GPU without a stream "
        "synchronise",
    ),
    "lean": (
        "the sync-free recipe and three DDP flags",
        "also DDP told the graph is static, no broadcast of the model's buffers before each forward, and one "
        "gradient bucket (no 1 MiB first bucket)",
    ),
    "onegraph": (
        "the lean variant's flags",
        "also one compiled graph instead of one per DDP gradient bucket, and gradients as views into DDP's buckets",
    ),
}
"""Each variant other than plain in the report's header: what its flags are and what they change."""
ORDERS = ("grouped", "alternate")
"""``--order`` values: ``grouped`` runs each method's 1- then N-process run (all repeats) before the next method;
``alternate`` runs one round of every method × process count per repeat, reversing the round every other repeat."""
RATES = ("samples_per_s", "step_samples_per_s", "steady_samples_per_s")
"""A run's throughputs: with ``--repeats`` > 1 a pair's tables show the median of each over the repeats."""
LOSS_LINE = "{'loss'"
"""How the Trainer's PrinterCallback (``--disable_tqdm true``) prints a training log on local rank 0."""


@dataclass(frozen=True)
class Pair:
    """One ``--pairs`` entry: ``batch`` is the global batch, or the per-device batch when ``per_device``."""

    precision: str
    batch: int
    steps: int
    nodrop: bool = False
    per_device: bool = False

    def per_device_batch(self, nproc: int) -> int:
        return self.batch if self.per_device else self.batch // nproc

    def global_batch(self, nproc: int) -> int:
        return self.batch * nproc if self.per_device else self.batch


@dataclass(frozen=True)
class Run:
    """One run of run_glue_iw.py: a pair's configuration on ``nproc`` processes, for ``method`` in ``compile_mode``,
    with ``variant``'s extra flags (``DDP_VARIANTS``) and wrapper (``WRAPPERS``)."""

    nproc: int
    pair: Pair
    method: str
    compile_mode: str
    out: Path
    repeat: int = 0
    variant: str = "plain"


def parse_pairs(text: str, nproc: int) -> list[Pair]:
    """``--pairs``' comma list; a ValueError with one line naming the bad entry and what was expected."""
    pairs = []
    for spec in text.split(","):
        fields = spec.split(":")
        expected = f"expected {PAIR_FORMAT} with PRECISION fp32|bf16"
        if len(fields) < 3:
            raise ValueError(f"{spec!r}: {expected}")
        precision, batch, steps, *tags = fields
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"{spec!r}: PRECISION must be fp32 or bf16 ({expected})")
        if not (batch.isdigit() and int(batch) > 0 and steps.isdigit() and int(steps) > 0):
            raise ValueError(f"{spec!r}: BATCH and STEPS must be positive integers ({expected})")
        unknown = [t for t in tags if t not in PAIR_TAGS]
        if unknown or len(set(tags)) != len(tags):
            raise ValueError(f"{spec!r}: tags must be nodrop and/or per_device, each at most once ({expected})")
        pair = Pair(precision, int(batch), int(steps), "nodrop" in tags, "per_device" in tags)
        if not pair.per_device and pair.batch % nproc:
            raise ValueError(f"{spec!r}: a global BATCH must be divisible by --nproc {nproc} (or tag it per_device)")
        pairs.append(pair)
    return pairs


def parse_choices(text: str, allowed: tuple[str, ...] | list[str]) -> list[str]:
    """A comma list of distinct values from ``allowed``; a ValueError saying what was expected."""
    values = text.split(",")
    if any(v not in allowed for v in values) or len(set(values)) != len(values):
        raise ValueError(f"expected a comma list of distinct values from {'|'.join(allowed)}, got {text!r}")
    return values


def schedule(
    pairs: int,
    modes: list[str],
    methods: list[str],
    nproc: int,
    repeats: int = 1,
    order: str = "grouped",
    variants: list[str] | tuple[str, ...] = ("plain",),
) -> list[tuple[int, str, str, str, int, int]]:
    """Every run as ``(pair index, compile mode, method, variant, processes, repeat)`` for ``pairs`` pairs, in launch
    order (see ``--order``): pairs and modes in turn, and within each the methods' runs (each method's variants side
    by side) grouped or alternating."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {'|'.join(ORDERS)}, got {order!r}")
    runs = []
    for pair in range(pairs):
        for mode in modes:
            if order == "grouped":
                arms = [(m, v) for m in methods for v in variants]
                runs += [(pair, mode, m, v, n, r) for m, v in arms for r in range(repeats) for n in (1, nproc)]
                continue
            for r in range(repeats):
                round_ = [(pair, mode, m, v, n, r) for m in methods for v in variants for n in (1, nproc)]
                runs += round_[::-1] if r % 2 else round_
    return runs


def run_name(pair: Pair, mode: str, method: str, nproc: int, repeat: int, repeats: int, variant: str = "plain") -> str:
    """The run's folder and log name: the original names for the original runs (eager IW-LoRA at a global batch),
    ``_VARIANT`` added for a variant other than plain, ``_rK`` (1-based) only when there are several repeats."""
    name = f"{pair.precision}_b{pair.batch}_n{nproc}" + ("_nodrop" if pair.nodrop else "")
    name += ("_per_device" if pair.per_device else "") + ("" if method == "iw" else f"_{method}")
    name += ("" if mode == "none" else f"_compile_{mode}") + ("" if variant == "plain" else f"_{variant}")
    return name + (f"_r{repeat + 1}" if repeats > 1 else "")


def method_label(method: str, variant: str = "plain") -> str:
    """A method's name in the markdown, ``+ VARIANT`` added for a variant other than plain (``LoRA + nosync``)."""
    return METHODS[method] + ("" if variant == "plain" else f" + {variant}")


def median(values: list[float | None]) -> float | None:
    """The median of the values that are not None (None when there are none)."""
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2


def summary(runs: list[dict]) -> dict:
    """One side of a pair over its repeats: the first repeat's run (its losses, sensitivities, dev metric) with each
    throughput replaced by the median over ``runs``; a single run unchanged."""
    if len(runs) == 1:
        return runs[0]
    return {**runs[0], **{k: median([r[k] for r in runs]) for k in RATES}, "repeats": len(runs)}


def sequence_row(run: dict, name: str) -> dict:
    """A run's line in the launch-order table: its steady ms/step and, for IW-LoRA, calibration ms/batch."""
    steady = run["steady_samples_per_s"]
    calib, batches = run["calibration_s"], run.get("calibration_batches") or 0
    return {
        "position": run["position"],
        "name": name,
        "method": run["method"],
        "variant": run.get("variant", "plain"),
        "torch_compile": run["torch_compile"],
        "nproc": run["nproc"],
        "repeat": run["repeat"],
        "steady_samples_per_s": steady,
        "steady_ms_per_step": 1000 * run["global_batch"] / steady if steady else None,
        "calib_ms_per_batch": 1000 * calib / batches if calib and batches else None,
    }


def complete_pairs(
    pairs: list[Pair],
    modes: list[str],
    methods: list[str],
    runs: dict[tuple[int, str, str, str], dict[int, list[dict]]],
    nproc: int,
    repeats: int,
    variants: list[str] | tuple[str, ...] = ("plain",),
) -> list[dict]:
    """The report's entry of every pair × mode × method × variant whose runs (1 and ``nproc`` processes, every
    repeat) are all done, in that order whatever the launch order; with repeats, each run of every repeat under
    ``runs`` (keyed by pair index, mode, method, variant)."""
    entries = []
    for index, pair in enumerate(pairs):
        for mode in modes:
            for method in methods:
                for variant in variants:
                    done = runs.get((index, mode, method, variant), {})
                    if any(len(done.get(n, [])) < repeats for n in (1, nproc)):
                        continue
                    by_repeat = {n: sorted(done[n], key=lambda r: r["repeat"]) for n in (1, nproc)}
                    entry = {
                        "method": method,
                        "variant": variant,
                        "torch_compile": mode,
                        "batch_mode": "per_device" if pair.per_device else "global",
                        "precision": pair.precision,
                        "dropout": not pair.nodrop,
                        ("per_device_batch" if pair.per_device else "global_batch"): pair.batch,
                        "steps": pair.steps,
                        "one": summary(by_repeat[1]),
                        "many": summary(by_repeat[nproc]),
                    }
                    if repeats > 1:
                        entry["runs"] = {str(n): rs for n, rs in by_repeat.items()}
                    entry["compare"] = compare(entry["one"], entry["many"])
                    entries.append(entry)
    return entries


SETUP = ("torch_compile", "batch_mode", "precision", "dropout", "per_device_batch", "global_batch", "steps")
"""The fields of a report entry that, with its method, say which runs it compares (its variant aside)."""


def baseline_variant(variants: list[str] | tuple[str, ...]) -> str:
    """The variant the others are compared against: plain when the invocation runs it, else the first listed
    (``--variants nosync,lean,onegraph``: lean and onegraph against nosync)."""
    return "plain" if "plain" in variants else variants[0]


def variant_ratios(entries: list[dict], baseline: str = "plain") -> list[dict]:
    """Each entry of a variant other than ``baseline`` against the baseline's entry of the same pair, mode and method
    (when the invocation has it): the variant's samples/s over the baseline's, for 1 and for N processes (steady,
    steps, train()), and the N ÷ 1 steady speedup of each."""
    out = []
    for e in entries:
        if e.get("variant", "plain") == baseline:
            continue
        setup = {k: e.get(k) for k in ("method", *SETUP)}
        same = [p for p in entries if all(p.get(k) == v for k, v in setup.items())]
        base = next((p for p in same if p.get("variant", "plain") == baseline), None)
        if base is None:
            continue
        row = {**{k: v for k, v in setup.items() if v is not None}, "variant": e["variant"], "baseline": baseline}
        for side in ("one", "many"):
            for key in RATES:
                row[f"{side}_{key}"] = [base[side][key], e[side][key]]
                row[f"{side}_{key}_ratio"] = ratio(e[side][key], base[side][key])
        row["speedup_steady"] = [base["compare"]["speedup_steady"], e["compare"]["speedup_steady"]]
        out.append(row)
    return out


def deberta_shapes_model(tokenizer_from: str, folder: Path) -> str:
    """A randomly initialised DeBERTa-v3-base-shaped classifier saved to ``folder`` with ``tokenizer_from``'s
    tokenizer: the real model's compute per step, for throughput (its accuracy means nothing)."""
    if (folder / "config.json").is_file():
        return str(folder)
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_step import deberta_v3_base_config

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(deberta_v3_base_config()).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_from) / name).is_file():
            shutil.copy(Path(tokenizer_from) / name, folder / name)
    return str(folder)


def no_dropout_model(model: str, folder: Path) -> str:
    """A copy of ``model`` (weights symlinked) whose config turns every dropout off."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in Path(model).iterdir():
        if f.name != "config.json" and not (folder / f.name).exists():
            (folder / f.name).symlink_to(f.resolve())
    config = json.loads((Path(model) / "config.json").read_text())
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        config[key] = 0.0
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return str(folder)


def free_port() -> int:
    """A free local port: a fixed one would clash with another launcher on the same machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script(variant: str) -> list[str]:
    """What the launcher runs, before run_glue_iw's flags: run_glue_iw.py, or the variant's wrapper with its flags
    and ``--`` (``WRAPPERS``)."""
    if variant not in WRAPPERS:
        return [str(ROOT / "run_glue_iw.py")]
    wrapper, *flags = WRAPPERS[variant]
    return [str(ROOT / wrapper), *flags, "--"]


def build_command(args: argparse.Namespace, model: str, run: Run, port: int) -> tuple[list[str], dict[str, str]]:
    """The launcher + run_glue_iw.py command line of one run (its variant's wrapper in place of run_glue_iw.py, if it
    has one), and its environment."""
    nproc, pair, method, compile_mode, out = run.nproc, run.pair, run.method, run.compile_mode, run.out
    if args.cpu:  # accelerate's CPU multi-process path needs MPI; torchrun sets up the same gloo group
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        launcher += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    else:  # (accelerate's own dynamo stays off: --torch_compile below compiles through the Trainer)
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc)]
        launcher += ["--num_machines", "1", "--dynamo_backend", "no"]
        launcher += ["--main_process_port", str(port)] + (["--multi_gpu"] if nproc > 1 else [])
    cmd = [
        *launcher, *script(run.variant), "--model_name_or_path", model, "--glue_dir", args.glue_dir,
        "--task_name", args.task, "--max_seq_length", "64", "--output_dir", str(out), "--do_train", "--do_eval",
        "--per_device_train_batch_size", str(pair.per_device_batch(nproc)), "--per_device_eval_batch_size", "128",
        "--max_steps", str(pair.steps), "--learning_rate", "5e-4", "--warmup_steps", "0.06", "--weight_decay", "0.01",
        "--adapter", "lora",
    ]  # fmt: skip
    if method == "iw":
        cmd += ["--iw_alpha", "1e-4", "--iw_normalize", "sum", "--iw_calib_steps", str(args.calib_steps)]
    else:  # plain LoRA: no penalty, no calibration
        cmd += ["--iw_alpha", "0"]
    cmd += [
        "--logging_steps", str(args.logging_steps), "--save_strategy", "no", "--eval_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true", "--seed", "1", "--dataloader_num_workers", "0",
        "--bf16", str(pair.precision == "bf16").lower(), "--ddp_find_unused_parameters", "false",
    ]  # fmt: skip
    if compile_mode != "none":
        cmd += ["--torch_compile", "true", "--torch_compile_mode", compile_mode]
    if pair.nodrop:
        cmd += ["--lora_dropout", "0"]
    if args.max_train_samples:
        cmd += ["--max_train_samples", str(args.max_train_samples)]
    if args.max_eval_samples:
        cmd += ["--max_eval_samples", str(args.max_eval_samples)]
    if args.cpu:  # (transformers refuses --ddp_backend in a single process that no launcher set up)
        cmd += ["--use_cpu", "true"] + (["--ddp_backend", "gloo"] if nproc > 1 else [])
    cmd += DDP_VARIANTS[run.variant]  # nosync: the sync-free recipe; lean, onegraph: also LEAN_DDP_FLAGS
    # Unbuffered: the arrival time of each log line times the steady steps (see launch).
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    env["PYTHONUNBUFFERED"] = "1"
    if not args.cpu:  # exactly nproc GPUs: one process on several would be nn.DataParallel with nproc× the batch
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(nproc))
    return cmd, env


def run_timed(
    cmd: list[str], env: dict[str, str], stamps: dict[str, list[float]] | None = None
) -> tuple[int, str, str, float, list[float]]:
    """Run ``cmd``: its return code, stdout, stderr, wall seconds and the seconds (since the start) at which each
    training log line arrived on stdout. ``stamps`` maps other line prefixes to lists that receive the arrival
    times of the lines starting with them (``"{'train_runtime'"``: the end of ``train()``)."""
    times: list[float] = []
    lines: list[str] = []
    stamps = stamps or {}
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: reading stdout alone cannot deadlock
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(LOSS_LINE):
                times.append(time.perf_counter() - t0)
            for prefix, arrivals in stamps.items():
                if line.startswith(prefix):
                    arrivals.append(time.perf_counter() - t0)
            lines.append(line)
        rc = proc.wait()
        wall = time.perf_counter() - t0
        err.seek(0)
        return rc, "".join(lines), err.read(), wall, times


def steady_rate(global_batch: int, steps: list[int], times: list[float]) -> float | None:
    """Samples/s from the 2nd to the last logged step (the 1st interval holds the compile warm-up); None when fewer
    than 3 steps were logged or the printed logs do not match the recorded ones."""
    if len(steps) != len(times) or len(steps) < 3 or times[-1] <= times[1]:
        return None
    return global_batch * (steps[-1] - steps[1]) / (times[-1] - times[1])


def run_outputs(out: Path) -> tuple[dict, dict, dict]:
    """A finished run's ``all_results.json``, ``iw_importance.json`` ({} for plain LoRA: none written) and
    ``trainer_state.json``."""
    results = json.loads((out / "all_results.json").read_text())
    importance_file = out / "iw_importance.json"
    importance = json.loads(importance_file.read_text()) if importance_file.is_file() else {}
    return results, importance, json.loads((out / "trainer_state.json").read_text())


def eval_metrics(results: dict) -> dict:
    """The ``eval_*`` metrics of a run's ``all_results.json``, its timings left out."""
    return {k: v for k, v in results.items() if k.startswith("eval_") and "runtime" not in k and "per_second" not in k}


def launch(args: argparse.Namespace, model: str, run: Run) -> dict:
    """One run of run_glue_iw.py under the launcher; returns its results, importance and log."""
    nproc, pair, method, compile_mode, out = run.nproc, run.pair, run.method, run.compile_mode, run.out
    cmd, env = build_command(args, model, run, free_port())
    rc, stdout, stderr, wall, times = run_timed(cmd, env)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.log").write_text(stdout + stderr)
    if rc != 0:
        raise SystemExit(f"bench_ddp: run {out.name} failed (rc {rc}):\n{(stderr or stdout)[-3000:]}")
    results, importance, state = run_outputs(out)
    modules = importance.get("modules", {})
    losses = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    calib = importance.get("calibration_seconds") or 0.0
    global_batch = pair.global_batch(nproc)
    logged = list(losses)
    return {
        "nproc": nproc,
        "repeat": run.repeat,
        "per_device_batch": pair.per_device_batch(nproc),
        "global_batch": global_batch,
        "method": method,
        "variant": run.variant,
        "torch_compile": compile_mode,
        "process_wall_s": wall,
        "train_runtime_s": results["train_runtime"],
        "calibration_s": calib,
        "calibration_batches": importance.get("calibration_batches") or 0,
        "samples_per_s": results["train_samples_per_second"],
        "step_samples_per_s": global_batch * pair.steps / (results["train_runtime"] - calib),
        "steady_samples_per_s": steady_rate(global_batch, logged, times),
        "log_seconds": dict(zip(logged, times)) if len(logged) == len(times) else {},
        "eval": eval_metrics(results),
        "sensitivities": {k: m["sensitivity"] for k, m in modules.items()} or None,
        "coefficients": {k: m["coefficient"] for k, m in modules.items()} or None,
        "losses": losses,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(one: dict, many: dict) -> dict:
    """The N-process run against the 1-process one; sensitivity fields None without sensitivities (plain LoRA)."""
    c: dict = dict.fromkeys(("sensitivity_max_rel_diff", "sensitivity_spearman", "coefficient_max_abs_diff"))
    if one["sensitivities"] and many["sensitivities"]:
        names = sorted(one["sensitivities"])
        s1 = [one["sensitivities"][k] for k in names]
        sn = [many["sensitivities"][k] for k in names]
        c["sensitivity_max_rel_diff"] = max(abs(a - b) / max(abs(a), 1e-30) for a, b in zip(s1, sn))
        c["sensitivity_spearman"] = float(spearmanr(s1, sn).statistic)
        c["coefficient_max_abs_diff"] = max(abs(one["coefficients"][k] - many["coefficients"][k]) for k in names)
    steps = sorted(set(one["losses"]) & set(many["losses"]))
    dl = [abs(one["losses"][s] - many["losses"][s]) for s in steps]
    c.update(
        loss_points=len(steps),
        loss_max_abs_diff=max(dl) if dl else None,
        loss_mean_abs_diff=sum(dl) / len(dl) if dl else None,
        loss_mean_1=sum(one["losses"][s] for s in steps) / len(steps) if steps else None,
        loss_mean_n=sum(many["losses"][s] for s in steps) / len(steps) if steps else None,
        speedup_train=ratio(many["samples_per_s"], one["samples_per_s"]),
        speedup_steps=ratio(many["step_samples_per_s"], one["step_samples_per_s"]),
        speedup_steady=ratio(many["steady_samples_per_s"], one["steady_samples_per_s"]),
    )
    return c


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def rate(one: dict, many: dict, key: str) -> str:
    return f"{fmt(one[key], '.0f')} → {fmt(many[key], '.0f')}"


def variant_flags(report: dict, variant: str) -> tuple[list[str], list[str]]:
    """A variant's extra run_glue_iw flags and its wrapper with the wrapper's flags (``[]``: none), as the report
    recorded them (reports written before the DDP variants recorded only ``sync_free_flags``)."""
    flags = report.get("variant_flags", {}).get(variant)
    if flags is None:
        flags = (
            report["sync_free_flags"] if variant == "nosync" and "sync_free_flags" in report else DDP_VARIANTS[variant]
        )
    return list(flags), list(report.get("variant_wrappers", {}).get(variant, WRAPPERS.get(variant, ())))


def variant_sentence(report: dict, variant: str, alone: bool) -> str:
    """The header's sentence on a variant other than plain: its flags, its wrapper and what they change."""
    name, change = VARIANT_NOTES[variant]
    flags, wrapper = variant_flags(report, variant)
    text = " Every run with" if alone else f" `+ {variant}` rows: the same runs with"
    text += f" {name} `{shlex.join(flags)}` appended to run_glue_iw's command line"
    if wrapper:
        text += f", run by `{shlex.join(wrapper)} -- <run_glue_iw.py flags>` in place of run_glue_iw.py"
    return text + f" ({change})."


def markdown(report: dict) -> str:
    n = report["nproc"]
    methods, modes = report.get("methods", ["iw"]), report.get("torch_compile", ["none"])
    variants = report.get("variants", ["plain"])
    extended = methods != ["iw"] or modes != ["none"] or variants != ["plain"]  # else the original table, unchanged
    batch_modes = report.get("batch_modes", ["global"])
    same = " or ".join({"global": "same global batch", "per_device": "same per-device batch"}[m] for m in batch_modes)
    intro = (
        f"`benchmarks/bench_ddp.py`: `{report['launcher']} run_glue_iw.py` with 1 and {n} processes, task "
        f"{report['task']}, {report.get('model', 'all-MiniLM-L6-v2')}, LoRA r=8 + IW (sum, α=1e-4), "
        f"{report['calib_steps']} calibration "
        "batches, seed 1. Sensitivities: relative difference per matrix between the two runs; loss: the logged "
        f"training loss every {report['logging_steps']} steps; throughput: samples/s of `train()` (calibration "
        "included) and of the steps alone (calibration time taken out)."
    )
    if "lora" in methods:
        intro += " LoRA rows: the same runs with `--iw_alpha 0` (plain LoRA: no calibration, no penalty)."
    if modes != ["none"]:
        intro += (
            " compile: the Trainer's `--torch_compile true --torch_compile_mode MODE` in both runs (none = eager); "
            "the train() and steps samples/s of a compiled run include its compile warm-up."
        )
    if extended or "per_device" in batch_modes:
        intro += (
            " Steady: samples/s from the 2nd to the last logged step (arrival times of rank 0's log lines: compile "
            "warm-up and calibration left out)."
        )
    for variant in variants:
        if variant != "plain":
            intro += variant_sentence(report, variant, alone=variants == [variant])
    repeats = report.get("repeats", 1)
    if repeats > 1:
        intro += (
            f" Every run {repeats}× ({report.get('order', 'grouped')} order, see the last table): each samples/s is "
            "the median over the repeats, the losses, sensitivities and dev metric are the first repeat's."
        )
    recipe = ""
    if set(variants) <= {"plain", "nosync"} and "nosync" in variants:
        recipe = ", plain vs sync-free recipe" if "plain" in variants else ", sync-free recipe"
    elif variants != ["plain"]:
        recipe = f", variants {' / '.join(variants)}"
    lines = [f"# {' / '.join(METHODS[m] for m in methods)}: 1 vs {n} processes, {same}{recipe} ({report['device']})"]
    lines += ["", intro, ""]
    key = objective_metric(report["task"])
    global_pairs = [p for p in report["pairs"] if p.get("batch_mode", "global") == "global"]
    if global_pairs:
        head = "| method | compile " if extended else ""
        tail = " samples/s 1 → N (steady) | speedup steady |" if extended else ""
        lines += [
            f"{head}| precision | dropout | global batch | per-GPU batch ({n} GPUs) | steps | "
            "sensitivity max rel. diff | Spearman | coef. max diff | loss mean abs diff (max) | mean loss 1 / N | "
            f"dev metric 1 / N | samples/s 1 → N (train) | speedup train | speedup steps |{tail}",
            "|---" * (14 + 4 * extended) + "|",
        ]
    for p in global_pairs:
        c, one, many = p["compare"], p["one"], p["many"]
        head = f"| {method_label(p['method'], p.get('variant', 'plain'))} | {p['torch_compile']} " if extended else ""
        tail = f" {rate(one, many, 'steady_samples_per_s')} | {fmt(c['speedup_steady'], '.2f')}× |" if extended else ""
        lines.append(
            f"{head}| {p['precision']} | {'on' if p['dropout'] else 'off'} | {p['global_batch']} | "
            f"{p['global_batch'] // n} | {p['steps']} | "
            f"{fmt(c['sensitivity_max_rel_diff'], '.1e')} | {fmt(c['sensitivity_spearman'], '.4f')} | "
            f"{fmt(c['coefficient_max_abs_diff'], '.1e')} | {fmt(c['loss_mean_abs_diff'], '.1e')} "
            f"({fmt(c['loss_max_abs_diff'], '.1e')}) | "
            f"{fmt(c['loss_mean_1'], '.4f')} / {fmt(c['loss_mean_n'], '.4f')} | "
            f"{fmt(one['eval'].get(key), '.4f')} / {fmt(many['eval'].get(key), '.4f')} | "
            f"{rate(one, many, 'samples_per_s')} | {fmt(c['speedup_train'], '.2f')}× | "
            f"{fmt(c['speedup_steps'], '.2f')}× |{tail}"
        )
    per_device = [p for p in report["pairs"] if p.get("batch_mode") == "per_device"]
    if per_device:
        if global_pairs:
            lines.append("")
        lines += [
            f"## Same per-device batch: {n} processes train {n}× the global batch",
            "",
            f"N ÷ 1: samples/s of the {n}-process run over the 1-process run's (ideal {n}). The two runs train "
            "different global batches, so their sensitivities need not agree: Spearman is information only.",
            "",
            "| method | compile | precision | dropout | per-device batch | global batch 1 → N | steps | "
            "samples/s 1 → N (train) | N ÷ 1 train | samples/s 1 → N (steps) | N ÷ 1 steps | "
            "samples/s 1 → N (steady) | N ÷ 1 steady | Spearman (info) | dev metric 1 / N |",
            "|---" * 15 + "|",
        ]
    for p in per_device:
        c, one, many = p["compare"], p["one"], p["many"]
        lines.append(
            f"| {method_label(p['method'], p.get('variant', 'plain'))} | {p['torch_compile']} | {p['precision']} | "
            f"{'on' if p['dropout'] else 'off'} | {p['per_device_batch']} | "
            f"{one['global_batch']} → {many['global_batch']} | {p['steps']} | "
            f"{rate(one, many, 'samples_per_s')} | {fmt(c['speedup_train'], '.2f')}× | "
            f"{rate(one, many, 'step_samples_per_s')} | {fmt(c['speedup_steps'], '.2f')}× | "
            f"{rate(one, many, 'steady_samples_per_s')} | {fmt(c['speedup_steady'], '.2f')}× | "
            f"{fmt(c['sensitivity_spearman'], '.4f')} | "
            f"{fmt(one['eval'].get(key), '.4f')} / {fmt(many['eval'].get(key), '.4f')} |"
        )
    if report.get("variant_ratios"):
        base = report["variant_ratios"][0].get("baseline", "plain")
        shown = {v["variant"] for v in report["variant_ratios"]}
        var = shown.pop() if len(shown) == 1 else "variant"
        what = {"nosync": "Sync-free recipe", "variant": "Each variant"}.get(var, f"`{var}`")
        faster = {"nosync": "the recipe", "variant": "the variant"}.get(var, var)
        each = "Each variant" if var == "variant" else f"Each `+ {var}`"
        lines += [
            "",
            f"## {what} ÷ {base}, measured in this invocation",
            "",
            f"{each} run against the {base} run of the same pair, compile mode and method: samples/s {base} → "
            f"{var} and {var} ÷ {base} (above 1: {faster} is faster), "
            "for the 1-process and the N-process run; N ÷ 1: the steady speedup of each.",
            "",
            f"| method | compile | precision | batch | steps | steady samples/s 1 proc. | {var} ÷ {base} 1 | "
            f"steady samples/s {n} proc. | {var} ÷ {base} {n} | train() {var} ÷ {base} 1 / {n} | "
            f"N ÷ 1 steady {base} / {var} |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for v in report["variant_ratios"]:
            batch = f"{v['per_device_batch']} per device" if "per_device_batch" in v else f"{v['global_batch']} global"
            lines.append(
                f"| {method_label(v['method'], v['variant'])} | {v['torch_compile']} | {v['precision']} | {batch} | "
                f"{v['steps']} | {' → '.join(fmt(x, '.0f') for x in v['one_steady_samples_per_s'])} | "
                f"{fmt(v['one_steady_samples_per_s_ratio'], '.3f')} | "
                f"{' → '.join(fmt(x, '.0f') for x in v['many_steady_samples_per_s'])} | "
                f"{fmt(v['many_steady_samples_per_s_ratio'], '.3f')} | {fmt(v['one_samples_per_s_ratio'], '.3f')} / "
                f"{fmt(v['many_samples_per_s_ratio'], '.3f')} | "
                f"{' / '.join(fmt(x, '.2f') + ('×' if x is not None else '') for x in v['speedup_steady'])} |"
            )
    if report.get("sequence"):
        lines += [
            "",
            "## Every run, in launch order",
            "",
            "Steady ms/step: the global batch over the steady samples/s; calibration ms/batch: IW-LoRA's calibration "
            "time over its batches (a batch costs about one eager LoRA step: a slow run shows in both).",
            "",
            "| # | run | method | compile | processes | repeat | samples/s (steady) | ms/step (steady) | "
            "calibration ms/batch |",
            "|---:|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in report["sequence"]:
            lines.append(
                f"| {row['position']} | {row['name']} | {method_label(row['method'], row.get('variant', 'plain'))} | "
                f"{row['torch_compile']} | "
                f"{row['nproc']} | {row['repeat'] + 1} | {fmt(row['steady_samples_per_s'], '.0f')} | "
                f"{fmt(row['steady_ms_per_step'], '.1f')} | {fmt(row['calib_ms_per_batch'], '.1f')} |"
            )
    return "\n".join(lines) + "\n"


def run_parser(
    script: str, doc: str | None, logging_steps: int, cpu_help: str, runs_dir: str, out: str
) -> argparse.ArgumentParser:
    """An argument parser with the flags ``build_command`` reads (model, data, calibration, logging, row limits,
    threads, CPU mode), ``--deberta_shapes``, ``--runs_dir`` and ``--out``: shared by bench_ddp and bench_run."""
    p = argparse.ArgumentParser(
        prog=Path(script).name, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True)
    p.add_argument("--glue_dir", required=True)
    p.add_argument("--task", default="sst2")
    p.add_argument("--calib_steps", type=int, default=150)
    p.add_argument("--logging_steps", type=int, default=logging_steps)
    p.add_argument("--max_train_samples", type=int, default=0)
    p.add_argument("--max_eval_samples", type=int, default=0, help="0 = the whole dev set")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument(
        "--deberta_shapes", action="store_true", help="a random DeBERTa-v3-base-shaped model (--model's tokenizer)"
    )
    p.add_argument("--cpu", action="store_true", help=cpu_help)
    p.add_argument("--runs_dir", default=runs_dir)
    p.add_argument("--out", default=out, help="writes OUT.json and OUT.md")
    return p


def parser() -> argparse.ArgumentParser:
    cpu = "gloo on CPU (a smoke test of the script, not a benchmark)"
    p = run_parser(__file__, __doc__, 10, cpu, "/tmp/iw_ddp_runs", "benchmarks/results/ddp")
    p.add_argument("--nproc", type=int, default=2, help="N, the processes (GPUs) of the second run of a pair (>= 2)")
    p.add_argument(
        "--pairs",
        default=DEFAULT_PAIRS,
        help=f"{PAIR_FORMAT},... (PRECISION fp32|bf16; BATCH global, or per device with per_device)",
    )
    p.add_argument(
        "--methods",
        default="iw",
        help="comma list of iw (IW-LoRA) | lora (plain LoRA, --iw_alpha 0): each pair runs once per method",
    )
    p.add_argument(
        "--torch_compile",
        nargs="?",
        const="default",
        default="none",
        metavar="MODE[,MODE...]",
        help=f"comma list of {'|'.join(COMPILE_MODES)} (none = eager; bare --torch_compile = default): each pair and "
        "method runs once per mode, compiled by the Trainer in the 1- and the N-process run",
    )
    p.add_argument(
        "--variants",
        default="plain",
        help=f"comma list of {' | '.join(DDP_VARIANTS)} (nosync: run_glue_iw with the sync-free recipe "
        f"{shlex.join(SYNC_FREE_FLAGS)}; lean: also {shlex.join(LEAN_DDP_FLAGS)}; onegraph: lean's flags through "
        f"{shlex.join(WRAPPERS['onegraph'])} --): each pair, mode and method runs once per variant, side by side, "
        "and a table compares each variant with plain (or, without plain, with the first listed)",
    )
    p.add_argument("--repeats", type=int, default=1, help="launch every run this many times (tables: median rates)")
    p.add_argument(
        "--order",
        choices=ORDERS,
        default="grouped",
        help="grouped: each method's 1- then N-process runs (all repeats) in turn; alternate: per repeat one round "
        "of every method and process count, reversed every other round (a first-run effect vs a method's cost)",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    if args.nproc < 2:
        p.error(f"--nproc: expected an integer >= 2 (the N-process run of each pair), got {args.nproc}")
    for flag in ("calib_steps", "logging_steps", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag}: expected a positive integer, got {getattr(args, flag)}")
    try:
        pairs = parse_pairs(args.pairs, args.nproc)
    except ValueError as e:
        p.error(f"--pairs: {e}")
    try:
        methods = parse_choices(args.methods, list(METHODS))
    except ValueError as e:
        p.error(f"--methods: {e}")
    try:
        modes = parse_choices(args.torch_compile, COMPILE_MODES)
    except ValueError as e:
        p.error(f"--torch_compile: {e}")
    try:
        variants = parse_choices(args.variants, list(DDP_VARIANTS))
    except ValueError as e:
        p.error(f"--variants: {e}")
    import torch

    if args.deberta_shapes:
        args.model = deberta_shapes_model(args.model, Path(args.runs_dir) / "deberta_v3_base_shapes")
    device = "CPU (gloo)" if args.cpu else f"{args.nproc}× {torch.cuda.get_device_name(0)}"
    model_name = "DeBERTa-v3-base shapes (random init)" if args.deberta_shapes else Path(args.model).name
    report: dict = {"device": device, "nproc": args.nproc, "task": args.task, "calib_steps": args.calib_steps}
    report["model"] = model_name
    launcher = "torchrun --nproc_per_node N (gloo)" if args.cpu else "accelerate launch --num_processes N"
    report.update(launcher=launcher, logging_steps=args.logging_steps, methods=methods, torch_compile=modes)
    report["batch_modes"] = [
        m for m in ("global", "per_device") if any(p.per_device == (m != "global") for p in pairs)
    ]
    report["command"] = shlex.join(["python", "benchmarks/bench_ddp.py", *(sys.argv[1:] if argv is None else argv)])
    report["variants"] = variants
    if "nosync" in variants:
        report["sync_free_flags"] = list(SYNC_FREE_FLAGS)
    if set(variants) - {"plain", "nosync"}:  # (plain and nosync reports as before)
        report["variant_flags"] = {v: list(DDP_VARIANTS[v]) for v in variants if v != "plain"}
        report["variant_wrappers"] = {v: list(WRAPPERS[v]) for v in variants if v in WRAPPERS}
    report.update(repeats=args.repeats, order=args.order, pairs=[], sequence=[])
    runs: dict[tuple[int, str, str, str], dict[int, list[dict]]] = {}  # (pair, mode, method, variant) -> N -> runs
    out = Path(args.out)
    for position, (index, mode, method, variant, nproc, repeat) in enumerate(
        schedule(len(pairs), modes, methods, args.nproc, args.repeats, args.order, variants), 1
    ):
        pair = pairs[index]
        model = no_dropout_model(args.model, Path(args.runs_dir) / "model_nodrop") if pair.nodrop else args.model
        name = run_name(pair, mode, method, nproc, repeat, args.repeats, variant)
        run = Run(nproc, pair, method, mode, Path(args.runs_dir) / name, repeat, variant)
        r = launch(args, model, run)
        r["position"] = position
        print(
            f"{name}: {r['samples_per_s']:.0f} samples/s (steps {r['step_samples_per_s']:.0f}, steady "
            f"{fmt(r['steady_samples_per_s'], '.0f')}), {r['eval']}",
            flush=True,
        )
        report["sequence"].append(sequence_row(r, name))
        runs.setdefault((index, mode, method, variant), {}).setdefault(nproc, []).append(r)
        report["pairs"] = complete_pairs(pairs, modes, methods, runs, args.nproc, args.repeats, variants)
        report["variant_ratios"] = variant_ratios(report["pairs"], baseline_variant(variants))
        group = runs[(index, mode, method, variant)]
        if all(len(group.get(n, [])) == args.repeats for n in (1, args.nproc)):  # this run completed its pair
            first = min(group[1], key=lambda x: x["repeat"])["position"]
            print(json.dumps(next(e for e in report["pairs"] if e["one"]["position"] == first)["compare"]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))  # after every run: partial results
        out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
