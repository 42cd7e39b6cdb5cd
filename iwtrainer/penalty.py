"""The IW penalty ``Σ_k c_k ‖Δ_k‖_F²`` with ``c_k = (1 − w_k)^β`` and ``Δ_k = s_k · B_k A_k``.

``delta`` (default) is exact and cheap through the r×r Gram matrices, never materialising ``B A``:

    ‖B A‖_F² = tr(Aᵀ Bᵀ B A) = Σ_ij (BᵀB)_ij (A Aᵀ)_ij

``factors`` is the source documents' surrogate ``Σ_k c_k (‖A_k‖_F² + ‖B_k‖_F²)`` (no scaling).

Speed: matrices of equal shape are stacked and handled by one batched matmul per group, so the cost is a
handful of kernels however many targets there are (a python loop over 72 modules costs +20–36 % step time).

Memory: on CUDA the gradient is one CUDA graph captured on a side stream, and cuBLAS keeps a workspace for every
stream it runs on (32 MiB on Hopper) for the life of the process: six times the graph's outputs on mpnet-base, and
1.25 % of a 4-bit mpnet-base step (benchmarks/results/qlora.md). For small ranks the graph therefore forms the four
r×r products as broadcast multiply-and-sum (``Σ_d a_id a_jd`` and alike: no cuBLAS call, so the stream gets no
workspace); its intermediates are freed inside the capture, so they stay in the graph's pool (reserved, not
allocated). Above :data:`BLAS_FREE_MAX_BYTES` per product the graph uses batched matmuls as before.

FSDP2 (``fully_shard``): each factor is a ``DTensor`` sharded across ranks. ``add_grad_`` then gathers the full
factors (LoRA factors are small), computes the same closed-form gradient on every rank and adds each rank's own shard
of it to the sharded ``.grad``, after FSDP has reduced (averaged) the task gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .importance import penalty_coefficients
from .settings import PENALTY_FORMS
from .targets import LoraTarget, find_lora_targets


def _is_dtensor(x: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(x, DTensor)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# The largest broadcast product (n·r²·max(d_in, d_out) values of the math dtype) the CUDA graph forms instead of a
# batched matmul: 16 MiB keeps the graph's pool under the 32 MiB cuBLAS workspace it saves (mpnet-base, r = 8: 9 MiB).
BLAS_FREE_MAX_BYTES = 16 * 2**20


class IWPenalty:
    """Callable ``() -> Σ_k c_k ‖Δ_k‖_F²`` over a fixed set of LoRA targets, grouped by shape for speed.

    Args:
        targets: the LoRA targets (``find_lora_targets(model)``).
        coefficients: ``c_k`` by target name; every target must have one.
        form: ``"delta"`` (exact ‖Δ‖²) or ``"factors"`` (‖A‖² + ‖B‖²).
    """

    def __init__(self, targets: list[LoraTarget], coefficients: Mapping[str, float], form: str = "delta"):
        if form not in PENALTY_FORMS:
            raise ValueError(f"iw_penalty must be one of {PENALTY_FORMS}, got {form!r}")
        missing = [t.name for t in targets if t.name not in coefficients]
        if missing:
            raise ValueError(
                f"no importance coefficient for {len(missing)} LoRA target(s), e.g. '{missing[0]}'; the importance "
                "file was computed for a different model or target_modules"
            )
        self.form = form
        self._w2_cache: dict[tuple[int, float], torch.Tensor] = {}
        self.cuda_graph = True  # add_grad_ on CUDA: replay one captured graph instead of ~30 kernel launches
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_key: tuple | None = None
        self._graph_out: tuple | None = None
        self.names = [t.name for t in targets]
        groups: dict[tuple, list[LoraTarget]] = {}
        for t in targets:
            key = (tuple(t.lora_A.shape), tuple(t.lora_B.shape), t.lora_A.dtype, t.lora_A.device)
            groups.setdefault(key, []).append(t)
        self._groups: list[tuple[list[nn.Parameter], list[nn.Parameter], torch.Tensor]] = []
        for (_, _, _, device), members in groups.items():
            # delta: fold s_k² into the coefficient; factors: the source penalises the raw factors.
            weight = [coefficients[t.name] * (t.scaling**2 if form == "delta" else 1.0) for t in members]
            self._groups.append(
                (
                    [t.lora_A for t in members],
                    [t.lora_B for t in members],
                    # the math dtype (fp32, or fp64 for fp64 factors), so .to() below is free
                    torch.tensor(weight, dtype=_at_least_fp32(members[0].lora_A).dtype, device=device),
                )
            )
        # Every factor in the order of _flat_views: each group's A's, then its B's.
        self._params = [p for a_list, b_list, _ in self._groups for p in (*a_list, *b_list)]
        # The CUDA graph's products without cuBLAS when every one of them is small (see the module docstring).
        self.graph_blas = form == "delta" and max(_product_bytes(*group) for group in self._groups) > (
            BLAS_FREE_MAX_BYTES
        )

    def __call__(self) -> torch.Tensor:
        if self.sharded:
            raise RuntimeError(
                "IWPenalty(): the factors are FSDP2 shards; use add_grad_ (IWTrainer's default 'grad' backend)"
            )
        total = None
        # Penalty math in fp32 even under autocast: the matrices are tiny and the value is a sum of squares.
        device_type = self._groups[0][2].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            for a_list, b_list, weight in self._groups:
                if self.form == "delta":
                    a = _at_least_fp32(torch.stack(a_list))  # (n, r, d_in)
                    b = _at_least_fp32(torch.stack(b_list))  # (n, d_out, r)
                    term = torch.einsum("nij,nij,n->", a @ a.mT, b.mT @ b, weight.to(a.dtype))
                else:
                    sq = _at_least_fp32(torch.stack(torch._foreach_norm(a_list + b_list))).square()
                    n = len(a_list)
                    term = torch.dot(sq[:n] + sq[n:], weight.to(sq.dtype))
                total = term if total is None else total + term
        return total

    @property
    def sharded(self) -> bool:
        """Whether the factors are FSDP2 ``DTensor`` shards."""
        return _is_dtensor(self._groups[0][0][0])

    def _grad_math(
        self, scale: float | torch.Tensor, groups: list | None = None, blas: bool = True
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """``P`` and, per shape group, the stacked ``scale·∂P/∂A`` and ``scale·∂P/∂B`` (no side effects); ``groups``
        replaces the factors by other tensors of the same shapes (the gathered ones under FSDP2); ``blas=False``
        forms the products by broadcasting instead of batched matmuls (no cuBLAS call).

        Closed form of ``c‖BA‖_F²``: ``∂/∂A = 2c (BᵀB) A``, ``∂/∂B = 2c B (AAᵀ)``; for ``factors``: ``2cA``, ``2cB``.
        """
        total, grads = None, []
        for index, (a_list, b_list, weight) in enumerate(groups if groups is not None else self._groups):
            a, b = _at_least_fp32(torch.stack(a_list)), _at_least_fp32(torch.stack(b_list))
            w2 = self._doubled_weight(index, weight, scale)  # 2·scale·c_k·s_k², shaped (n, 1, 1)
            if self.form == "delta" and blas:
                gram_a, gram_b = a @ a.mT, b.mT @ b
                gbw = gram_b * w2
                d_a, d_b = gbw @ a, b @ (gram_a * w2)
                term = (gram_a * gbw).sum()  # 2·scale·Σ c s² ‖BA‖²
            elif self.form == "delta":  # the same four products, each a broadcast (n, ·, r, r) product and a sum
                gram_a = (a.unsqueeze(2) * a.unsqueeze(1)).sum(-1)  # (n, r, r, d_in) → A Aᵀ
                gram_b = (b.unsqueeze(3) * b.unsqueeze(2)).sum(1)  # (n, d_out, r, r) → Bᵀ B
                gbw = gram_b * w2
                d_a = (gbw.unsqueeze(-1) * a.unsqueeze(1)).sum(2)  # (n, r, r, d_in) → (BᵀB) A
                d_b = (b.unsqueeze(-1) * (gram_a * w2).unsqueeze(1)).sum(2)  # (n, d_out, r, r) → B (AAᵀ)
                term = (gram_a * gbw).sum()
            else:
                d_a, d_b = a * w2, b * w2
                term = (d_a * a).sum() + (d_b * b).sum()
            grads.append((d_a.to(a_list[0].dtype), d_b.to(b_list[0].dtype)))
            total = term if total is None else total + term
        return total / (2 * scale), grads

    @torch.no_grad()
    def add_grad_(self, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Add ``scale · ∇P`` to every factor's ``.grad`` without autograd and return ``P`` (detached).

        About ten kernels per shape group instead of the two gradient-accumulation nodes per factor that autograd
        would add. On CUDA with a constant ``scale`` the whole computation is one CUDA-graph replay (kernel
        launches, not FLOPs, are its cost). ``.grad`` accumulates, so calling this before or after the task
        loss's backward gives the same sum; a missing ``.grad`` becomes a view of the stacked result (no copy).
        """
        if self.sharded:
            return self._add_grad_sharded(scale)
        if self._graphed(scale):
            value, flat = self._replay(float(scale))
        else:
            value, grads = self._grad_math(scale)
            flat = _flat_views(grads)
        # One foreach over every factor, not two per shape group: in a compiled step of ~10 ms the launches count.
        _accumulate_grads(self._params, flat)
        return value

    def _graphed(self, scale: float | torch.Tensor) -> bool:
        """Whether ``add_grad_`` replays the CUDA graph: on CUDA, with a constant ``scale`` (not fp16's loss scale)."""
        return self.cuda_graph and not torch.is_tensor(scale) and self._groups[0][2].device.type == "cuda"

    def _add_grad_sharded(self, scale: float | torch.Tensor) -> torch.Tensor:
        """FSDP2: gather every factor (two all-gathers per target), compute the full ``scale·∇P`` on every rank (the
        same numbers everywhere) and add each rank's shard of it to its ``.grad`` shard; returns ``P``."""
        from torch.distributed.tensor import distribute_tensor

        full = [([a.full_tensor() for a in a_list], [b.full_tensor() for b in b_list], weight)
                for a_list, b_list, weight in self._groups]  # fmt: skip
        value, grads = self._grad_math(scale, full)
        for (a_list, b_list, _), (d_a, d_b) in zip(self._groups, grads):
            for param, grad in zip([*a_list, *b_list], [*d_a.unbind(0), *d_b.unbind(0)]):
                # src_data_rank=None: every rank holds the full tensor, so it only keeps its own shard (no traffic)
                local = distribute_tensor(grad.contiguous(), param.device_mesh, param.placements, src_data_rank=None)
                if param.grad is None:
                    param.grad = local
                else:
                    param.grad.add_(local)
        return value

    def _replay(self, scale: float) -> tuple[torch.Tensor, list]:
        ptrs = tuple(p.data_ptr() for p in self._params)
        if self._graph is None or self._graph_key != (scale, ptrs):  # factors moved or were replaced: recapture
            stream = _capture_stream(self._groups[0][2].device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside capture (allocator; cuBLAS's workspace if graph_blas)
                    self._grad_math(scale, blas=self.graph_blas)
            torch.cuda.current_stream().wait_stream(stream)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph, stream=stream):
                value, grads = self._grad_math(scale, blas=self.graph_blas)
            self._graph_out = (value, _flat_views(grads))
            self._graph_key = (scale, ptrs)
        first, first_out = self._params[0], self._graph_out[1][0]
        if first.grad is not None and first.grad.data_ptr() == first_out.data_ptr():
            # .grad still aliases the previous replay's output, which the replay is about to overwrite
            raise RuntimeError("IWPenalty.add_grad_: .grad was not reset (zero_grad) since the previous call")
        self._graph.replay()
        return self._graph_out

    def _doubled_weight(self, index: int, weight: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(scale):  # fp16 loss scale: changes between steps
            return (weight * (2 * scale)).view(-1, 1, 1)
        key = (index, float(scale))
        if key not in self._w2_cache:  # α is fixed for a run: build once
            self._w2_cache[key] = (weight * (2 * scale)).view(-1, 1, 1)
        return self._w2_cache[key]


def _product_bytes(a_list: list[torch.Tensor], b_list: list[torch.Tensor], weight: torch.Tensor) -> int:
    """Bytes of the largest broadcast product ``_grad_math(blas=False)`` forms for one shape group."""
    (r, d_in), (d_out, _) = a_list[0].shape, b_list[0].shape
    return len(a_list) * r * r * max(d_in, d_out) * weight.element_size()


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream of ``device`` on which every penalty graph is warmed up and captured.

    cuBLAS keeps a workspace for each stream it runs on (32 MiB on Hopper) for the life of the process, so a graph
    with matmuls (``IWPenalty.graph_blas``) should use one stream only. Warming up on a new stream and capturing on
    torch's default capture stream used two: after its first penalty an IW step held
    69 MiB more than LoRA's on an H200 (benchmarks/results/qlora.md, stage table): the size of two workspaces and
    the graph's 5 MiB of outputs (check_penalty_graph.py measures what one shared stream keeps).
    """
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


def _flat_views(grads: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Per shape group's stacked ``(dA, dB)``, the per-factor views in the order of ``IWPenalty._params``."""
    return [g for d_a, d_b in grads for g in (*d_a.unbind(0), *d_b.unbind(0))]


def _accumulate_grads(params: list[nn.Parameter], grads: Sequence[torch.Tensor]) -> None:
    """``p.grad += g``; a missing ``.grad`` becomes ``g`` itself (a view of the stacked result: no copy kernel)."""
    existing = [i for i, p in enumerate(params) if p.grad is not None]
    if len(existing) == len(params):
        torch._foreach_add_([p.grad for p in params], list(grads))
        return
    for i, p in enumerate(params):
        if p.grad is None:
            p.grad = grads[i]
    if existing:
        torch._foreach_add_([params[i].grad for i in existing], [grads[i] for i in existing])


def iw_penalty(
    model: nn.Module,
    weights: Mapping[str, float],
    beta: float = 1.0,
    form: str = "delta",
    adapter_name: str | None = None,
) -> torch.Tensor:
    """``Σ_k (1 − w_k)^β ‖Δ_k‖_F²`` for ``model``'s LoRA targets given importance weights ``w_k`` (no α).

    Convenience for custom training loops; build an :class:`IWPenalty` once and call it every step instead
    when speed matters.
    """
    targets = find_lora_targets(model, adapter_name)
    return IWPenalty(targets, penalty_coefficients(weights, beta), form)()
