"""``examples/sft_iw.py`` as a user runs it, offline: a tiny Llama and a chat JSONL file, a config file that flags
override, IW-LoRA on the assistant tokens; and its one-line refusals."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env
from tiny import tiny_causal, tiny_tokenizer

pytest.importorskip("trl", reason="iwtrainer[trl] not installed")
EXAMPLE = ROOT / "examples" / "sft_iw.py"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    tiny_causal("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(f"t{rng.randrange(4, 97)}" for _ in range(n))

    rows = [{"messages": [{"role": "user", "content": words(5)}, {"role": "assistant", "content": words(4)}]}
            for _ in range(40)]  # fmt: skip
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "sft.yaml").write_text("iw_alpha: 0.01\nlearning_rate: 0.001\nmax_steps: 2\n")
    return root


def run(*flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(EXAMPLE), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)


def test_sft_example_trains_iw_lora_from_a_config_and_flags(files, tmp_path):
    out = tmp_path / "out"
    done = run("--model_name_or_path", str(files / "model"), "--dataset_name", str(files / "chat.jsonl"),
               "--config", str(files / "sft.yaml"), "--max_steps", "3", "--output_dir", str(out),
               "--per_device_train_batch_size", "4", "--use_cpu", "--bf16", "false", "--report_to", "none",
               "--iw_calib_steps", "2", "--lora_r", "4", "--logging_steps", "1", "--assistant_only_loss", "true",
               "--dtype", "float32", "--save_strategy", "no")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "iw_importance.png").is_file()
    record = json.loads((out / "iw_importance.json").read_text())
    assert record["settings"]["iw_alpha"] == 0.01 and record["settings"]["iw_calib_steps"] == 2  # config, flag
    assert record["calibration_batches"] == 2
    assert len(record["modules"]) == 2 * 7  # all-linear: q, k, v, o, gate, up, down in both layers
    adapter = json.loads((out / "adapter_config.json").read_text())
    short = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}
    assert adapter["r"] == 4 and short == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dataset_name", "missing.jsonl"], "--dataset_name missing.jsonl: no such file"),
        (["--dataset_name", "x.jsonl", "--iw_alpha", "-1"], "iw_alpha must be a finite number >= 0"),
        (["--dataset_name", "x.jsonl", "--iw_normalize", "median"], "--iw_normalize/--iw-normalize: invalid choice"),
    ],
)
def test_sft_example_refuses_bad_input_in_one_line(files, tmp_path, flags, message):
    out = tmp_path / "out"
    done = run("--model_name_or_path", str(files / "model"), "--output_dir", str(out), "--use_cpu", *flags)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in done.stderr.strip().splitlines()[-1]  # one line, after any library warnings
    assert done.stderr.strip().splitlines()[-1].startswith("sft_iw.py: error: ")
    assert not out.exists()
