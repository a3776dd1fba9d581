"""The attention masks a model family expects from our KV cache's boolean mask.

The runner builds one boolean mask per forward, ``[B, 1, S, L]`` (query attends to key column), with each
query's and each key's position in its sequence (a packed row holds several sequences). Handed a 4D
mask, transformers uses it as it is for every layer, so what the family adds on top of causality has to be
in the mask already:

- a sliding window (Mistral, Phi-3, Qwen2 with ``use_sliding_window``, Gemma-2/3's local layers): a query
  at position ``p`` sees columns ``c > p - window`` only (transformers' ``sliding_window_overlay``);
- mixed layer types (``config.layer_types`` with both kinds): a dict ``{"full_attention": ...,
  "sliding_attention": ...}``, which those models' forwards accept in place of one mask;
- eager attention (families whose attention SDPA cannot run, e.g. Gemma-2's logit soft-capping): an
  additive float mask (0 or the dtype's minimum) instead of a boolean one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True, slots=True)
class MaskLayout:
    """What one model needs: ``window`` for sliding layers (None: none), whether layer types are mixed
    (masks go as a dict), and ``additive_dtype`` for eager attention (None: boolean masks for SDPA)."""

    window: int | None = None
    mixed_layers: bool = False
    additive_dtype: torch.dtype | None = None

    @classmethod
    def of(cls, model: torch.nn.Module, dtype: torch.dtype) -> MaskLayout:
        config: Any = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        layer_types = list(getattr(text, "layer_types", None) or [])
        window = getattr(text, "sliding_window", None)
        if layer_types:
            # the layer types say which layers slide (Qwen2 keeps a window size it does not use)
            mixed = SLIDING in layer_types and FULL in layer_types
            if SLIDING not in layer_types:
                window = None
        else:
            mixed = False
        eager = getattr(config, "_attn_implementation", "sdpa") == "eager"
        return cls(window if window else None, mixed and bool(window), dtype if eager else None)

    @property
    def is_plain(self) -> bool:
        """True when the boolean causal mask is what the model wants (Llama, GPT-NeoX, OPT, ...)."""
        return self.window is None and self.additive_dtype is None

    def build(
        self, mask: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """``mask`` [B, 1, S, L] bool, the queries' ``positions`` [B, S] and the keys' ``key_positions``
        [B, L] -> what ``attention_mask`` takes."""
        if self.is_plain:
            return mask
        full = self._encode(mask)
        if self.window is None:
            return full
        # padding queries attend to column 0 only and sit at position 0, which every window keeps
        windowed = self._encode(
            mask & (key_positions[:, None, None, :] > positions[:, None, :, None] - self.window)
        )
        if self.mixed_layers:
            return {FULL: full, SLIDING: windowed}
        return windowed

    def _encode(self, mask: torch.Tensor) -> torch.Tensor:
        if self.additive_dtype is None:
            return mask
        additive = torch.zeros(mask.shape, dtype=self.additive_dtype, device=mask.device)
        return additive.masked_fill_(~mask, torch.finfo(self.additive_dtype).min)
