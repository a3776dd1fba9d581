"""Decode rows' two attention kernels against attention written out by hand: grouped query heads, rows of
different lengths, float32 and bf16; ``auto`` picks what its own timings say, and never times off the CPU."""

from __future__ import annotations

import pytest
import torch

from server.runtime import decode_attention
from server.runtime.decode_attention import MATMUL_MIN_GAIN, attend, choose_kernel, timings
from server.runtime.decode_mirror import decode_mask
from tests.unit.test_varlen import Attention

ROWS, HQ, HKV, D, WIDTH = 5, 4, 2, 8, 11


def by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float64 attention: q [R, HQ, 1, D], k/v [R, HKV, L, D], mask [R, 1, 1, L] -> [R, 1, HQ, D]."""
    q, k, v = q.double(), k.double(), v.double()
    k, v = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)  # query head h -> h // G
    scores = (q @ k.transpose(-1, -2)) * D**-0.5
    return (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v).transpose(1, 2)


def inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    q = torch.randn(ROWS, HQ, 1, D).to(dtype)
    k = torch.randn(ROWS, HKV, WIDTH, D).to(dtype)
    v = torch.randn(ROWS, HKV, WIDTH, D).to(dtype)
    positions = torch.tensor([[0], [3], [10], [5], [7]])
    return q, k, v, decode_mask(positions, WIDTH, None), decode_mask(positions, WIDTH, 3)


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_each_kernel_is_attention_by_hand(
    kernel: decode_attention.Kernel, dtype: torch.dtype, tol: float
) -> None:
    q, k, v, mask, windowed = inputs(dtype)
    for m in (mask, windowed):
        out = attend(kernel, Attention(), q, k, v, m, D**-0.5)
        assert out.dtype == dtype and out.shape == (ROWS, 1, HQ, D)
        torch.testing.assert_close(out.double(), by_hand(q, k, v, m), atol=tol, rtol=tol)


def test_masked_columns_are_not_read() -> None:
    q, k, v, mask, _ = inputs(torch.float32)
    scribbled_k, scribbled_v = k.clone(), v.clone()
    scribbled_k[~mask[:, 0, 0][:, None, :, None].expand_as(k)] = 1e4
    scribbled_v[~mask[:, 0, 0][:, None, :, None].expand_as(v)] = 1e4
    torch.testing.assert_close(
        attend("matmul", Attention(), q, scribbled_k, scribbled_v, mask, None),  # None: 1/sqrt(D)
        attend("matmul", Attention(), q, k, v, mask, D**-0.5),
    )


def test_a_named_kernel_is_used_as_named_and_auto_is_sdpa_off_the_cpu() -> None:
    shape = {
        "num_heads": HQ,
        "num_kv_heads": HKV,
        "head_dim": D,
        "dtype": torch.float32,
        "rows": 4,
        "width": 64,
    }
    cpu = torch.device("cpu")
    assert choose_kernel("sdpa", cpu, **shape) == "sdpa"
    assert choose_kernel("matmul", cpu, **shape) == "matmul"
    before = dict(decode_attention._timings)
    assert choose_kernel("auto", torch.device("cuda"), **shape) == "sdpa"
    assert decode_attention._timings == before  # nothing was timed


def test_auto_on_the_cpu_takes_the_matmuls_only_where_its_timings_say_sdpa_is_slower() -> None:
    shape = {"num_heads": HQ, "num_kv_heads": HKV, "head_dim": D, "dtype": torch.float32}
    kernel = choose_kernel("auto", torch.device("cpu"), **shape, rows=100, width=10_000)
    sdpa_s, matmul_s = timings(HQ, HKV, D, 16, 256, dtype=torch.float32)  # clipped to the timing shape
    assert (kernel == "matmul") == (sdpa_s >= MATMUL_MIN_GAIN * matmul_s)
    assert (HQ, HKV, D, 16, 256, torch.float32) in decode_attention._timings


@pytest.mark.parametrize("value", ["flash", "", "SDPA"])
def test_a_bad_decode_attention_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--decode-attention", value])
    assert exit_info.value.code == 2
    assert f"argument --decode-attention: invalid choice: '{value}'" in capsys.readouterr().err


def test_a_good_decode_attention_reaches_the_settings() -> None:
    from server.cli import build_parser, settings_from_args

    args = build_parser().parse_args(["serve", "--decode-attention", "matmul"])
    assert settings_from_args(args).decode_attention == "matmul"
