"""Batched sampling on the model's device, one call per step, with no host synchronization.

Per-sequence sampling state lives in fixed slots (the runner's sequence slots, ``--max-num-seqs``), in device tensors indexed by slot,
so one step gathers every row's parameters with ``tensor[slots]`` and the whole call is pure tensor ops of
fixed shapes: it can be captured in a CUDA graph together with the decode step.

Order (vLLM's): logit bias and min-tokens masking -> repetition penalty -> frequency/presence penalties ->
greedy argmax or temperature -> top-k -> top-p -> min-p -> sample.

Logprobs (only for the rows that asked, on the device, top-k there: a step copies ``[R, k]`` values to the
host, never a vocabulary-sized row). As vLLM's default ``logprobs_mode="raw_logprobs"``, they are the
log-softmax of the model's own logits, before bias, penalties, temperature and filters; the sampler built
with ``"processed_logprobs"`` reports the distribution the token was drawn from instead (after every stage;
for greedy rows, after bias and penalties). Filtered tokens there have logprob -inf, sent as -9999.0 as
OpenAI does.

Randomness: Gumbel-max (equivalently the exponential race). Row ``b`` samples
``argmax_i(logits[b, i] / T + g(seed, step, i))`` where ``g`` is Gumbel noise from a counter-based hash of
(the request's seed, the slot's step counter, the token id). The noise of a row therefore depends on nothing
but its own request: not on the slot number, the batch size, or its neighbours in the batch.

Memory: per slot one int32 output-count row and one bool prompt-mask row of ``vocab_size`` entries, e.g.
65 slots x 128k vocab x (4 + 1) B = 42 MB.
The first request with ``logit_bias`` or ``min_tokens`` adds a float32 bias row and a bool "blocked until
min_tokens" row per slot (another 42 MB there); servers that never see them never allocate them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from server.engine.types import PositionLogprobs, SamplingParams
from server.runtime.token_bitmask import allowed_tokens

LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]
LOGPROBS_MODES: tuple[str, ...] = get_args(LogprobsMode)
NO_LOGPROB = -9999.0  # OpenAI's value for "very unlikely"; JSON has no -inf

# splitmix64 constants as signed int64 (torch has no uint64 arithmetic); products wrap modulo 2**64.
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
# Odd multiplier that spreads the step counter before mixing; any odd 64-bit constant works.
_STEP_MUL = 0xD6E8FEB86659FD93 - (1 << 64)

# Columns of the per-slot float parameter table.
_TEMPERATURE, _TOP_P, _MIN_P, _REPETITION, _PRESENCE, _FREQUENCY = range(6)
_DEFAULT_FLOAT_PARAMS = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)
# Columns of the per-slot int64 table.
_TOP_K, _SEED, _STEP, _MIN_TOKENS = range(4)


def _shift_right_logical(x: torch.Tensor, bits: int) -> torch.Tensor:
    # >> on int64 is arithmetic (sign-extending); masking off the top `bits` bits makes it logical.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer on int64 tensors (bit patterns as uint64, wrapping arithmetic)."""
    x = (x ^ _shift_right_logical(x, 30)) * _MIX1
    x = (x ^ _shift_right_logical(x, 27)) * _MIX2
    return x ^ _shift_right_logical(x, 31)


UNIFORM_BITS = 23  # hash bits per uniform draw: (x + 0.5) / 2**23 is exact in float32


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise ``[B, V]`` float32, a pure function of (seed, step, token id) per entry.

    ``seeds``, ``steps``: ``[B]`` int64. Two hash rounds: one per row (seed, step), one per token id.
    The top ``UNIFORM_BITS`` (23) bits of the hash give a uniform ``u = (x + 0.5) / 2**23`` in (0, 1),
    exact in float32 (``x + 0.5`` needs 24 bits), so never 0 or 1 and the noise always finite: with 24 bits
    the largest ``x + 0.5`` rounded to ``2**24``, ``u`` to 1 and the noise to +inf, once in 2**24 draws, and
    a grammar-masked token (-inf + inf = NaN) won the argmax. 23 bits cap the noise at about 16.6: a token
    whose probability is below about 6e-8 relative to the best is never drawn.
    """
    row_key = splitmix64(splitmix64(seeds) + (steps + 1) * _STEP_MUL)  # [B]
    token_ids = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)  # [V]
    bits = splitmix64(row_key[:, None] + token_ids[None, :] * _GOLDEN)  # [B, V]
    return -torch.log(-torch.log(open_uniform(bits)))


def open_uniform(bits: torch.Tensor) -> torch.Tensor:
    """int64 hash bits -> float32 uniforms strictly inside (0, 1): ``(x + 0.5) / 2**23`` of the top 23 bits."""
    top = _shift_right_logical(bits, 64 - UNIFORM_BITS).to(torch.float32)  # in [0, 2**23)
    return (top + 0.5) * (1.0 / (1 << UNIFORM_BITS))


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    repetition_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
    presence_penalty: torch.Tensor,
) -> torch.Tensor:
    """Repetition penalty (CTRL/HF, over prompt and output tokens), then frequency and presence
    penalties (OpenAI, over output tokens only). Returns new float32 logits.

    logits ``[B, V]`` float32; prompt_mask ``[B, V]`` bool; output_counts ``[B, V]`` int; the penalties ``[B]``.
    """
    counts = output_counts.to(torch.float32)  # [B, V]
    generated = output_counts > 0  # [B, V]
    rep = repetition_penalty[:, None]  # [B, 1]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(prompt_mask | generated, penalized, logits)
    return (
        logits - frequency_penalty[:, None] * counts - presence_penalty[:, None] * generated.to(torch.float32)
    )


def apply_filters(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Top-k, then top-p on the top-k-renormalized distribution, then min-p. Dropped tokens get -inf;
    the most likely token is always kept. Returns new logits.

    logits ``[B, V]`` float32 (already divided by temperature); top_k ``[B]`` int64 (``<= 0`` or ``>= V``:
    off); top_p ``[B]`` float32 in (0, 1] (1: off); min_p ``[B]`` float32 in [0, 1] (0: off).
    Top-k keeps every token tied with the k-th largest logit (as HF does). Top-p keeps the smallest prefix of
    the descending order whose probability mass reaches ``top_p``. Min-p drops tokens whose probability is
    below ``min_p`` times the largest; that ratio is ``exp(logit - max_logit)`` whatever the normalization,
    so it compares logits and does not depend on the filters before it.
    """
    vocab_size = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # [B, V]
    k = torch.where((top_k <= 0) | (top_k > vocab_size), vocab_size, top_k)  # [B]
    kth_logit = sorted_logits.gather(1, (k - 1)[:, None])  # [B, 1]
    keep = sorted_logits >= kth_logit  # [B, V], a prefix of the sorted order

    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)  # [B, V]
    mass_before = torch.cumsum(probs, dim=-1) - probs
    # top_p == 1 must keep everything even where float rounding pushes the cumulative mass past 1.
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)

    keep &= sorted_logits >= sorted_logits[:, :1] + torch.log(min_p)[:, None]  # log(0) = -inf keeps all
    keep[:, 0] = True
    keep_by_token = torch.empty_like(keep).scatter_(1, order, keep)  # [B, V] back to token order
    return logits.masked_fill(~keep_by_token, float("-inf"))


@dataclass(slots=True, frozen=True)
class SamplingFeatures:
    """Which stages a step must run; host-known, so skipping a stage never reads a device tensor.

    A runner capturing CUDA graphs can capture one graph per feature set (or just ``ALL``).
    """

    penalties: bool = True
    filters: bool = True
    random: bool = True
    bias: bool = True  # logit_bias or min_tokens


ALL_FEATURES = SamplingFeatures()


@dataclass(slots=True)
class LogprobTensors:
    """Logprobs of some rows of a step, still on the device. ``rows`` ``[R]`` are batch rows; the others
    are ``[R]`` (the token at the position, its logprob and rank) and ``[R, K]`` (top ``K``, descending)."""

    rows: torch.Tensor
    token_ids: torch.Tensor
    logprobs: torch.Tensor
    ranks: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor

    def to_host(self, ks: Sequence[int]) -> list[PositionLogprobs]:
        """One ``PositionLogprobs`` per row, keeping ``ks[r]`` of the top entries of row ``r``. Small copies
        only: ``[R]`` and ``[R, K]``."""
        ids, lps, ranks = self.token_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist()
        top_ids, top_lps = self.top_ids.tolist(), self.top_logprobs.tolist()
        return [
            PositionLogprobs(
                token_id=ids[r],
                logprob=max(lps[r], NO_LOGPROB),
                rank=ranks[r],
                top_ids=tuple(top_ids[r][:k]),
                top_logprobs=tuple(max(v, NO_LOGPROB) for v in top_lps[r][:k]),
            )
            for r, k in enumerate(ks)
        ]


def position_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, k: int, rows: torch.Tensor | None = None
) -> LogprobTensors:
    """Log-softmax of ``logits`` ``[N, V]`` at ``token_ids`` ``[N]`` (value and rank) and its top ``k``,
    all on the device. ``rows`` labels the N rows (default ``0..N-1``)."""
    logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)  # [N, V]
    chosen = logprobs.gather(1, token_ids[:, None])  # [N, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # [N], 1 = most likely (ties share the best rank)
    top_logprobs, top_ids = (
        logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], token_ids[:, None][:, :0])
    )
    if rows is None:
        rows = torch.arange(len(token_ids), device=token_ids.device)
    return LogprobTensors(rows, token_ids, chosen[:, 0], ranks, top_ids, top_logprobs)


@dataclass(slots=True)
class SamplerOutput:
    """One step's samples ``[B]``, and the logprobs of the rows that asked (None when none did)."""

    token_ids: torch.Tensor
    logprobs: LogprobTensors | None = None


class Sampler:
    """Per-slot sampling state on ``device``, and one batched sampling call per step.

    Slots ``0 .. num_slots - 1`` hold sequences; slot ``num_slots`` is scratch for the padding rows of a
    bucketed batch: whatever those rows sample is recorded there and never read by a real slot.
    """

    def __init__(
        self,
        vocab_size: int,
        num_slots: int,
        device: torch.device,
        logprobs_mode: LogprobsMode = "raw_logprobs",
        num_valid_ids: int | None = None,
    ) -> None:
        if vocab_size < 1 or num_slots < 1:
            raise ValueError(f"vocab_size and num_slots must be positive, got {vocab_size}, {num_slots}")
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        self.vocab_size = vocab_size
        # Models pad their embedding past the tokenizer's vocabulary (to a multiple of 64, say); those ids
        # decode to nothing, so they are never sampled.
        valid = vocab_size if num_valid_ids is None else max(1, min(num_valid_ids, vocab_size))
        self.num_valid_ids = valid
        self._padded_ids = (
            torch.arange(vocab_size, device=device) >= valid if valid < vocab_size else None
        )  # [V] bool
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.logprobs_mode = logprobs_mode
        rows = num_slots + 1  # + the scratch slot for padding rows
        self._float_params = torch.tensor([_DEFAULT_FLOAT_PARAMS] * rows, dtype=torch.float32, device=device)
        # top_k, seed, step, min_tokens
        self._int_params = torch.zeros(rows, 4, dtype=torch.int64, device=device)
        self._prompt_mask = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)  # [S+1, V]
        self._output_counts = torch.zeros(rows, vocab_size, dtype=torch.int32, device=device)  # [S+1, V]
        # Allocated on first use (most servers never see logit_bias or min_tokens): [S+1, V] each.
        self._logit_bias: torch.Tensor | None = None
        self._min_tokens_block: torch.Tensor | None = None  # ids EOS-like until min_tokens are out
        # Host-side view of which started slots need which stage, so `features()` costs no device read.
        self._active: dict[int, SamplingFeatures] = {}

    def start(
        self,
        slot: int,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        seed: int,
        stop_token_ids: Sequence[int] = (),
    ) -> None:
        """A sequence enters ``slot``: its params go to the slot's device rows, its prompt tokens are marked
        for the repetition penalty, and its output counts and step counter restart at zero.
        ``stop_token_ids`` (EOS and the request's own) cannot be sampled before ``params.min_tokens``."""
        self._check_slot(slot)
        if prompt_token_ids and not 0 <= min(prompt_token_ids) <= max(prompt_token_ids) < self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        named = [t for t, _ in params.logit_bias] + list(stop_token_ids)
        if named and not 0 <= min(named) <= max(named) < self.vocab_size:
            raise ValueError(f"logit_bias and stop token ids must be in [0, {self.vocab_size})")
        # Assignment from a host tensor is one small host-to-device copy per table.
        self._float_params[slot] = torch.tensor(
            [
                params.temperature,
                params.top_p,
                params.min_p,
                params.repetition_penalty,
                params.presence_penalty,
                params.frequency_penalty,
            ],
            dtype=torch.float32,
        )
        self._int_params[slot] = torch.tensor([params.top_k, seed, 0, params.min_tokens], dtype=torch.int64)
        self._output_counts[slot].zero_()
        self._prompt_mask[slot].zero_()
        if prompt_token_ids:
            ids = torch.tensor(list(prompt_token_ids), dtype=torch.int64, device=self.device)
            self._prompt_mask[slot, ids] = True
        self._clear_bias(slot)
        blocked = params.min_tokens > 0 and bool(stop_token_ids)
        if (params.logit_bias or blocked) and self._logit_bias is None:
            # both tables at once: a captured decode graph of the "bias" stage holds both addresses
            self._logit_bias = self._new_table(torch.float32)
            self._min_tokens_block = self._new_table(torch.bool)
        if params.logit_bias and self._logit_bias is not None:
            ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.int64, device=self.device)
            values = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32, device=self.device)
            self._logit_bias[slot, ids] = values
        if blocked and self._min_tokens_block is not None:
            ids = torch.tensor(list(stop_token_ids), dtype=torch.int64, device=self.device)
            self._min_tokens_block[slot, ids] = True
        penalized = (
            params.repetition_penalty != 1.0
            or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0
        )
        filtered = 0 < params.top_k < self.vocab_size or params.top_p < 1.0 or params.min_p > 0.0
        self._active[slot] = SamplingFeatures(
            penalties=penalized,
            filters=filtered and not params.greedy,
            random=not params.greedy,
            bias=bool(params.logit_bias) or blocked,
        )

    def free(self, slot: int) -> None:
        """The sequence in ``slot`` left: the slot goes back to defaults (greedy, no penalties)."""
        self._check_slot(slot)
        self._float_params[slot] = torch.tensor(_DEFAULT_FLOAT_PARAMS, dtype=torch.float32)
        self._int_params[slot].zero_()
        self._output_counts[slot].zero_()
        self._prompt_mask[slot].zero_()
        self._clear_bias(slot)
        self._active.pop(slot, None)

    def _new_table(self, dtype: torch.dtype) -> torch.Tensor:
        # a normal tensor even when the first use comes inside a step's inference mode: later in-place
        # updates (start/free) run outside it
        with torch.inference_mode(False):
            return torch.zeros(self.num_slots + 1, self.vocab_size, dtype=dtype, device=self.device)

    def _clear_bias(self, slot: int) -> None:
        if self._logit_bias is not None:
            self._logit_bias[slot].zero_()
        if self._min_tokens_block is not None:
            self._min_tokens_block[slot].zero_()

    def features(self) -> SamplingFeatures:
        """The stages some started slot needs (a safe superset for any batch of started slots)."""
        return SamplingFeatures(
            penalties=any(f.penalties for f in self._active.values()),
            filters=any(f.filters for f in self._active.values()),
            random=any(f.random for f in self._active.values()),
            bias=any(f.bias for f in self._active.values()),
        )

    def __call__(
        self, logits: torch.Tensor, slots: torch.Tensor, features: SamplingFeatures | None = None
    ) -> torch.Tensor:
        """Sample one token per row. logits ``[B, V]`` (any float dtype), slots ``[B]`` int64 -> ``[B]`` int64."""
        return self.sample(logits, slots, features).token_ids

    def sample(
        self,
        logits: torch.Tensor,
        slots: torch.Tensor,
        features: SamplingFeatures | None = None,
        *,
        logprob_rows: torch.Tensor | None = None,
        num_logprobs: int = 0,
        token_bitmask: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """Sample one token per row: logits ``[B, V]`` (any float dtype), slots ``[B]`` int64.

        Records each sampled token in its slot's output counts and advances the slot's step counter.
        ``features`` skips stages no row needs; None derives them from the started slots. Passing a feature
        set that lacks a stage some row needs silently skips that stage for the row. ``logprob_rows``
        ``[R]`` (batch rows) get the sampled token's logprob and the top ``num_logprobs`` alternatives.
        ``token_bitmask`` ``[B, W]`` int32 (``server.runtime.token_bitmask``) rules out, per row, the tokens
        its grammar forbids before anything else: greedy, sampling and logprobs all see only allowed ones.
        """
        if features is None:
            features = self.features()
        logits = logits.to(torch.float32)  # [B, V]
        if self._padded_ids is not None:
            logits = logits.masked_fill(self._padded_ids, float("-inf"))  # [B, V]
        if token_bitmask is not None:
            logits = logits.masked_fill(~allowed_tokens(token_bitmask, self.vocab_size), float("-inf"))
        raw = logits
        fparams = self._float_params[slots]  # [B, 6]
        iparams = self._int_params[slots]  # [B, 4]

        if features.bias:
            if self._logit_bias is not None:
                logits = logits + self._logit_bias[slots]
            if self._min_tokens_block is not None:
                early = iparams[:, _STEP] < iparams[:, _MIN_TOKENS]  # [B]
                logits = logits.masked_fill(self._min_tokens_block[slots] & early[:, None], float("-inf"))
        if features.penalties:
            logits = apply_penalties(
                logits,
                self._prompt_mask[slots],
                self._output_counts[slots],
                fparams[:, _REPETITION],
                fparams[:, _FREQUENCY],
                fparams[:, _PRESENCE],
            )
        next_ids = torch.argmax(logits, dim=-1)  # [B], first maximal index, as HF generate
        processed = logits  # [B, V], the distribution each row's token is drawn from

        if features.random:
            temperature = fparams[:, _TEMPERATURE]  # [B]
            greedy = temperature == 0.0
            scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]  # [B, V]
            if features.filters:
                scaled = apply_filters(scaled, iparams[:, _TOP_K], fparams[:, _TOP_P], fparams[:, _MIN_P])
            noise = gumbel_noise(iparams[:, _SEED], iparams[:, _STEP], self.vocab_size)  # [B, V]
            sampled = torch.argmax(scaled + noise, dim=-1)  # [B]
            next_ids = torch.where(greedy, next_ids, sampled)
            if logprob_rows is not None and self.logprobs_mode == "processed_logprobs":
                processed = torch.where(greedy[:, None], logits, scaled)

        lp = None
        if logprob_rows is not None:
            dist = raw if self.logprobs_mode == "raw_logprobs" else processed
            lp = position_logprobs(dist[logprob_rows], next_ids[logprob_rows], num_logprobs, logprob_rows)
        self._record(slots, next_ids)
        return SamplerOutput(next_ids, lp)

    def _record(self, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        # Accumulating scatters (atomic adds, graph-safe, no host sync): padding rows all point at the scratch
        # slot, so several rows may add to the same entry, and only the scratch slot absorbs them. Its counts
        # may wrap after ~2**31 padding rows; harmless, since its penalties are the identity.
        flat_index = slots * self.vocab_size + token_ids  # [B] into the flattened [S+1, V] counts
        self._output_counts.view(-1).scatter_add_(0, flat_index, torch.ones_like(slots, dtype=torch.int32))
        self._int_params[:, _STEP].index_add_(0, slots, torch.ones_like(slots))

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} is outside [0, {self.num_slots})")

    # Read-only views for tests and debugging (they copy to the host: never call them inside a step).
    def output_counts(self, slot: int) -> torch.Tensor:
        """Counts ``[V]`` of the tokens sampled in ``slot`` since it started."""
        return self._output_counts[slot].cpu()

    def step_count(self, slot: int) -> int:
        """Tokens sampled in ``slot`` since it started."""
        return int(self._int_params[slot, _STEP])
