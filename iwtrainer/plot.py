"""Where the capacity went, as a picture: layers × matrix types, one heatmap per quantity.

    importance weight w_k  |  penalty coefficient (1 − w_k)^β  |  final ‖Δ_k‖_F = s_k·‖B_k A_k‖_F  |  rank r_k

``‖B A‖_F`` is computed through the r×r Grams (``‖BA‖_F² = Σ_ij (BᵀB)_ij (AAᵀ)_ij``) from the adapter the run saved
(or the model in memory), with each module's own scale (peft's ``alpha_pattern``/``rank_pattern``, rsLoRA, AdaLoRA's
``lora_E``). Ranks come from the method's record: ``rank_allocation.json`` (gradnorm), ``adalora_ranks.json``
(AdaLoRA's final ranks), ``wsa_ranks.json`` (WSA's effective ranks), else the adapter's factor shapes.

    python -m iwtrainer.plot RUN_DIR [--out PNG]      # writes RUN_DIR/iw_importance.png by default
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import torch

from .importance import IMPORTANCE_FILE

PLOT_FILE = "iw_importance.png"
_BLOCK = re.compile(r"^(?P<prefix>.*?)\.(?P<layer>\d+)\.(?P<kind>.+)$")


def layer_and_kind(name: str) -> tuple[int, str]:
    """``bert.encoder.layer.3.attention.self.query`` -> ``(3, "attention.self.query")`` (first numbered part)."""
    match = _BLOCK.match(name)
    return (int(match["layer"]), match["kind"]) if match else (0, name)


def _delta_norm(a: torch.Tensor, b: torch.Tensor, scale: float, e: torch.Tensor | None = None) -> float:
    a, b = a.double(), b.double()
    if e is not None:  # AdaLoRA: Δ = s·B diag(E) A
        a = a * e.double().reshape(-1, 1)
    gram = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0)
    return float(abs(scale) * gram.sqrt())


def delta_norms_from_model(model: torch.nn.Module) -> dict[str, float]:
    """``‖Δ_k‖_F`` of every plain LoRA layer of a (peft) model in memory. Under FSDP2 the factors are gathered
    first: a collective, so every rank must call this."""
    from .targets import find_lora_targets, whole_tensor

    with torch.no_grad():
        return {
            t.name: _delta_norm(whole_tensor(t.lora_A), whole_tensor(t.lora_B), t.scaling)
            for t in find_lora_targets(model)
        }


def _pattern_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    for key, value in (pattern or {}).items():  # peft: exact name, a name suffix, or a regex
        if name == key or name.endswith("." + key) or re.fullmatch(key, name):
            return value
    return default


def delta_norms_from_adapter(run_dir: str) -> dict[str, float]:
    """``‖Δ_k‖_F`` from ``adapter_model.safetensors`` + ``adapter_config.json`` (LoRA family and AdaLoRA)."""
    from safetensors.torch import load_file

    config_path = os.path.join(run_dir, "adapter_config.json")
    weights_path = os.path.join(run_dir, "adapter_model.safetensors")
    if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
        return {}
    with open(config_path) as handle:
        config = json.load(handle)
    tensors = load_file(weights_path)
    prefix = "base_model.model."
    out: dict[str, float] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight") and not key.endswith(".lora_A"):
            continue
        stem = key.rsplit(".lora_A", 1)[0]
        b = tensors.get(key.replace(".lora_A", ".lora_B"))
        if b is None:
            continue
        e = tensors.get(f"{stem}.lora_E")
        name = stem[len(prefix) :] if stem.startswith(prefix) else stem
        if e is not None:  # AdaLoRA scales by lora_alpha / init_r (its ranknum)
            scale = float(config.get("lora_alpha", 1)) / float(config.get("init_r") or a.shape[0])
        else:
            rank = _pattern_value(config.get("rank_pattern"), name, config.get("r", a.shape[0]))
            alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", rank))
            scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        out[name] = _delta_norm(a, b, scale, e)
    return out


def _read(run_dir: str, file: str) -> Any:
    path = os.path.join(run_dir, file)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def run_ranks(run_dir: str) -> tuple[str, dict[str, int]] | None:
    """The method's per-matrix ranks from its record, with a title: allocated, AdaLoRA final or WSA effective."""
    alloc = _read(run_dir, "rank_allocation.json")
    if alloc:
        return "allocated rank r_k", {n: int(m["rank"]) for n, m in alloc["modules"].items()}
    ada = _read(run_dir, "adalora_ranks.json")
    if ada and ada.get("final_rank_pattern"):
        return "AdaLoRA final rank", {n: int(r) for n, r in ada["final_rank_pattern"].items()}
    wsa = _read(run_dir, "wsa_ranks.json")
    if wsa:
        return "WSA effective rank r_eff", {n: int(m["r_eff"]) for n, m in wsa.items()}
    return None


def run_panels(run_dir: str) -> dict[str, dict[str, float]]:
    """Every quantity a finished run directory holds, as ``{title: {module: value}}``."""
    panels: dict[str, dict[str, float]] = {}
    record = _read(run_dir, IMPORTANCE_FILE)
    if record:
        panels["importance weight w_k"] = {n: m["weight"] for n, m in record["modules"].items()}
        panels["coefficient (1-w_k)^beta"] = {n: m["coefficient"] for n, m in record["modules"].items()}
    norms = delta_norms_from_adapter(run_dir)
    if norms:
        panels["final ||Delta_k||_F"] = norms
    ranks = run_ranks(run_dir)
    if ranks:
        panels[ranks[0]] = {k: float(v) for k, v in ranks[1].items()}
    return panels


def plot_panels(panels: Mapping[str, Mapping[str, float]], path: str, title: str = "") -> str | None:
    """One heatmap (layers × matrix types) per panel, side by side, written to ``path``; ``None`` if nothing to draw.

    Written through a temporary file and renamed, like every file the package writes.
    """
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = sorted({n for values in panels.values() for n in values})
    layers = sorted({layer_and_kind(n)[0] for n in names})
    kinds = sorted({layer_and_kind(n)[1] for n in names})
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 2.6 * len(panels), 1.2 + 0.32 * len(layers)))
    axes = np.atleast_1d(axes)
    for ax, (label, values) in zip(axes, panels.items()):
        grid = np.full((len(layers), len(kinds)), np.nan)
        for name, value in values.items():
            layer, kind = layer_and_kind(name)
            grid[layers.index(layer), kinds.index(kind)] = value
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(kinds)), [k.replace("attention.", "att.") for k in kinds], rotation=60, fontsize=7)
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
        ax.set_ylabel("layer", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_run(run_dir: str, path: str | None = None) -> str | None:
    """``run_dir/iw_importance.png`` (or ``path``) from a finished run's files; ``None``: nothing to plot."""
    return plot_panels(run_panels(run_dir), path or os.path.join(run_dir, PLOT_FILE), os.path.basename(run_dir))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m iwtrainer.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished run's output_dir (iw_importance.json, adapter, rank records)")
    parser.add_argument("--out", default=None, help=f"PNG to write (default: RUN_DIR/{PLOT_FILE})")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.run_dir):
        sys.exit(f"python -m iwtrainer.plot: error: {args.run_dir!r} is not a directory; expected a run's output_dir")
    written = plot_run(args.run_dir, args.out)
    if written is None:
        sys.exit(
            f"python -m iwtrainer.plot: error: {args.run_dir!r} has no {IMPORTANCE_FILE}, adapter or rank record "
            "to plot; expected the output_dir of a finished run"
        )
    print(written)


if __name__ == "__main__":
    main()
