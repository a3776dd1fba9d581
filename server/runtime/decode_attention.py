"""How one-token rows (decode rows) attend: torch SDPA, or two matmuls around a float32 softmax, chosen by
measurement.

A decode row is one query per head against its past. torch's CPU SDPA runs its flash-attention kernel for
it, and how fast that is depends on the CPU: on a 2-core AMD EPYC Zen 4 (AVX512-BF16, no AMX), torch 2.13,
16 rows of 64-512 keys, 16 heads of 64, it took 1.3-8.6 ms per layer in bf16 where the two matmuls took
0.2-1.6 ms (5-6x less), and the 193M Llama's 16-row decode step spent 41% of its time there. On the 2-core
Intel Xeon with AMX, an earlier session measured matmuls over the decode mirror at about 2x SDPA's time.
So ``auto`` times both at load, on the model's heads and dtype, and takes the matmuls only where SDPA takes
``MATMUL_MIN_GAIN`` times longer.

The matmuls' numerics are transformers' eager attention's: scores in the model's dtype, softmax in float32,
probabilities back to the model's dtype. SDPA's CPU kernel keeps the scores in float32, so in bf16 the two
round differently (a greedy token may differ at a near-tie); in float32 they agree to rounding. Grouped
query heads multiply their key head as one matrix (no ``repeat_kv`` copy). Prompt chunks keep SDPA.
"""

from __future__ import annotations

import logging
import types
from typing import Literal, cast

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from server.runtime.decode_mirror import decode_mask
from server.runtime.prepack import fastest

log = logging.getLogger(__name__)

DecodeAttention = Literal["auto", "sdpa", "matmul"]
Kernel = Literal["sdpa", "matmul"]
MATMUL_MIN_GAIN = 1.25  # auto: the matmuls where SDPA takes this many times longer
TIMING_ROWS = 16  # auto's timing: this many rows (at most the slots) ...
TIMING_WIDTH = 256  # ... of up to this many keys (at most the context)


def matmul_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``query`` [R, Hq, 1, D], ``key``/``value`` [R, Hkv, L, D], ``mask`` [R, 1, 1, L] bool (True: attend;
    every row attends at least one column) -> [R, 1, Hq, D], as ``sdpa_attention_forward`` returns it."""
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(rows, kv_heads, heads // kv_heads, dim)  # the query heads sharing each key head
    scores = torch.matmul(q, key.transpose(-1, -2)).float().mul_(scaling)  # [R, Hkv, G, L]
    scores.masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).reshape(rows, 1, heads, dim)


def attend(
    kernel: Kernel,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """One-token rows through ``kernel``: shapes as ``matmul_attention``'s; ``module`` the attention layer
    (SDPA reads its key-value grouping)."""
    if kernel == "matmul":
        return matmul_attention(
            query, key, value, mask, scaling if scaling is not None else query.shape[-1] ** -0.5
        )
    out, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, is_causal=False)
    return out


def choose_kernel(
    mode: DecodeAttention,
    device: torch.device,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    rows: int,
    width: int,
) -> Kernel:
    """``mode`` where it names a kernel; ``auto``: SDPA off the CPU, else the faster on ``rows`` (at most
    ``TIMING_ROWS``) rows of up to ``width`` (at most ``TIMING_WIDTH``) keys (see the module docstring)."""
    if mode != "auto":
        return mode
    if device.type != "cpu":
        return "sdpa"
    shape = (num_heads, num_kv_heads, head_dim, min(rows, TIMING_ROWS), min(width, TIMING_WIDTH))
    sdpa_s, matmul_s = timings(*shape, dtype=dtype)
    kernel: Kernel = "matmul" if sdpa_s >= MATMUL_MIN_GAIN * matmul_s else "sdpa"
    log.info(
        "decode attention, %d rows of up to %d keys, %s: SDPA %.2f ms, matmuls %.2f ms; using %s",
        shape[3],
        shape[4],
        str(dtype).removeprefix("torch."),
        sdpa_s * 1e3,
        matmul_s * 1e3,
        kernel,
    )
    return kernel


_timings: dict[tuple[int, int, int, int, int, torch.dtype], tuple[float, float]] = {}  # once per process


def timings(
    num_heads: int, num_kv_heads: int, head_dim: int, rows: int, width: int, *, dtype: torch.dtype
) -> tuple[float, float]:
    """(SDPA, matmuls) seconds for ``rows`` CPU decode rows whose lengths spread over ``1 .. width``."""
    key_ = (num_heads, num_kv_heads, head_dim, rows, width, dtype)
    if key_ not in _timings:
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(rows, num_heads, 1, head_dim, generator=generator).to(dtype)
        k = torch.randn(rows, num_kv_heads, width, head_dim, generator=generator).to(dtype)
        v = torch.randn(rows, num_kv_heads, width, head_dim, generator=generator).to(dtype)
        mask = decode_mask(torch.linspace(0, width - 1, rows).long()[:, None], width, None)
        # what sdpa_attention_forward reads of an attention layer
        layer = cast(torch.nn.Module, types.SimpleNamespace(num_key_value_groups=num_heads // num_kv_heads))
        scaling = head_dim**-0.5
        with torch.inference_mode():
            _timings[key_] = (
                fastest(lambda: attend("sdpa", layer, q, k, v, mask, scaling)),
                fastest(lambda: attend("matmul", layer, q, k, v, mask, scaling)),
            )
    return _timings[key_]
