"""Every Python snippet of README.md runs as written, one after the other, on the real MiniLM (IWTRAINER_MODEL) and,
for the causal-LM ones, a tiny Llama saved with an offline tokenizer (IWTRAINER_CAUSAL_MODEL)."""

from __future__ import annotations

import re

import torch
from helpers import MODEL, ROOT, e2e
from tiny import tiny_causal, tiny_tokenizer

pytestmark = e2e


def readme_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_snippets_run_as_written(tmp_path, monkeypatch):
    snippets = readme_snippets()
    assert len(snippets) >= 3
    monkeypatch.setenv("IWTRAINER_MODEL", str(MODEL))
    causal = tmp_path / "causal"
    tiny_causal("llama").save_pretrained(causal)
    tiny_tokenizer().save_pretrained(causal)
    monkeypatch.setenv("IWTRAINER_CAUSAL_MODEL", str(causal))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for i, code in enumerate(snippets):
        exec(compile(code, f"README.md python snippet {i + 1}", "exec"), namespace)
    assert (tmp_path / "out" / "iw_importance.json").is_file()  # IWTrainer calibrated and trained
    assert (tmp_path / "out_plain" / "iw_importance.json").is_file()  # the callback inside a plain Trainer
    assert namespace["cb"].record["settings"]["iw_normalize"] == "max"
    assert namespace["sft"].iw_callback.record["calibration_batches"] == 4  # IWSFTTrainer on the causal LM
    assert (tmp_path / "out_sft" / "iw_importance.json").is_file()
    assert (tmp_path / "out_mixin" / "iw_importance.json").is_file()  # IWMixin on a user's Trainer subclass
    with torch.no_grad():  # the merged model predicts as the adapter it came from
        inputs = namespace["inputs"]
        torch.testing.assert_close(namespace["merged"](**inputs).logits, namespace["adapted"](**inputs).logits,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
