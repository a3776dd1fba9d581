"""The torch side of grammar constraints: per-row allowed-token bitmasks (llguidance's layout: int32 words,
bit ``t % 32`` of word ``t // 32`` allows token ``t``) filled on the host from each constrained row's
matcher, and unpacked on the device into the boolean mask the sampler applies."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engine.types import TokenConstraint

_BITS = 32


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + _BITS - 1) // _BITS


def fill_token_bitmask(
    num_rows: int, vocab_size: int, rows: Sequence[tuple[int, TokenConstraint]]
) -> torch.Tensor:
    """Host bitmask ``[num_rows, W]`` int32: every token allowed (all bits set) except on the rows given,
    which get their constraint's next-token mask."""
    bitmask = torch.full((num_rows, bitmask_words(vocab_size)), -1, dtype=torch.int32)  # [R, W]
    nbytes = bitmask.shape[1] * bitmask.element_size()
    for row, constraint in rows:
        constraint.fill_bitmask(bitmask[row].data_ptr(), nbytes)
    return bitmask


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bitmask ``[B, W]`` int32 -> allowed ``[B, V]`` bool (on the bitmask's device, no host sync)."""
    shifts = torch.arange(_BITS, dtype=torch.int32, device=bitmask.device)  # [32]
    bits = (bitmask[:, :, None] >> shifts) & 1  # [B, W, 32]; arithmetic shift, then the low bit only
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()  # [B, V]
