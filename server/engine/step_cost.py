"""How many prompt tokens a step may take beside decode rows, from what the last steps cost. Torch-free.

A step that computes prompt tokens beside decode rows holds every decoding stream's next token up for
as long as it runs, so the prompt tokens it takes decide the inter-token latency's tail; too few starve
admission instead (a chat turn's uncached tail waits for many steps). What a prompt token costs depends on
the machine: measured with 16 base streams of the 193M Llama on 2 cores, about 1/60 of a decode step in
float32 on an AMD EPYC Zen 4 (1.9 ms against about 120 ms), about 1/100 in bf16 on an Intel Xeon with AMX
(0.47 ms against about 50 ms), about 1/40 in bf16 on an AVX2-only EPYC Zen 3 (3.8 ms against about 150 ms:
no bf16 kernels, the linears widen to float32). A fixed cap of 16 tokens plus one per decode row kept the
Xeon's inter-token p99 at 1.5x its median but raised the mean TTFT of chat turns 2-4 from 0.45 s (no cap)
to 4.2 s; a cap of 64 gave 1.0 s at 2.0x.

So ``StepCost`` fits what steps cost, ``seconds = fixed + per_row * decode_rows + per_token * prompt_tokens``,
by least squares over the last steps (each step's weight decays by ``FORGET``), and allows as many prompt
tokens as keep a step within ``ratio`` decode steps *of the same decode rows*, never fewer than ``floor``
plus one per decode row (until measured: that). The row term matters: under a burst of new prompts the
decode rows drop (streams wait for their prompts), and a mixed step of 8 rows compared with a decode step of
16 would make prompt tokens look free and the allowance run away (measured before the fit: 75 prompt tokens
a step where 20 keep the ratio, steps at 2.9 decode steps). Where the steps cannot tell two terms apart
(every step mixed with the same prompt tokens, or the same decode rows throughout), a small ridge holds
each slope at its last estimate instead of letting noise move it.

The floor binds where prompt tokens are dear. On the Zen 3 a prompt token costs about 1/40 of a 16-row
decode step, so the fit allows about 20 beside 16 rows; a floor of 16 plus one per row (32) overrode it
and held mixed steps at 1.7-2.0 decode steps: in four interleaved pairs of closed runs (16 base streams,
20 s) the base row's inter-token p99 / p50 was 1.83-2.08 with that floor and 1.54-1.79 with 8 (24 beside
16 rows), p99 225-278 ms against 285-320, at the same tokens/s (89-92 against 76-89) and time to first
token (p50 0.65-0.79 s against 0.65-0.75). A lower ratio does not help there (1.5 with the floor of 8:
the fit still asks for less than the floor, which binds).

The first estimate of a prompt token's cost needs steps of different prompt tokens. Under a queue that
never drains every step takes the allowance, so until it is measured the allowance alternates between the
floor and ``PROBE_TOKENS`` more (measured before the probe: 16 streams whose prompts kept arriving held
the allowance at its floor for good, every step at 8 prompt tokens, admission starved, 0.6x the tokens/s).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_RATIO = 1.6  # a step with prompt tokens may take this many decode steps (of the same decode rows)
FORGET = 1 / 32  # each step's weight in the fit decays by this much per later step
MIN_SPREAD_TOKENS = 4.0  # the first estimate of a token's cost waits for steps' prompt tokens to spread this
# much (standard deviation): fewer say more about noise than about their cost
PROBE_TOKENS = 16  # until then every other step may take this many more than the floor
RIDGE = 0.01  # pull of each slope's last estimate, relative to its regressor's second moment

_N = 3  # the fit's terms: fixed, per decode row, per prompt token


@dataclass(slots=True)
class StepCost:
    """The running fit; ``observe`` every step, ``allowance`` the prompt tokens for the next."""

    floor: int  # prompt tokens a step with decode rows may always take, plus one per decode row
    ceiling: int  # never more (the step's token budget)
    ratio: float = DEFAULT_RATIO
    fixed_s: float | None = None  # what a step of decode rows costs whatever its rows
    row_s: float | None = None  # what each decode row adds
    token_s: float | None = None  # what each prompt token adds
    # the weighted normal equations: sum of w * x x^T (row-major) and of w * x * seconds, x = (1, rows, tokens)
    _xx: list[float] = field(default_factory=lambda: [0.0] * (_N * _N))
    _xy: list[float] = field(default_factory=lambda: [0.0] * _N)
    _probe: bool = False  # before the first estimate: whether the next step may take PROBE_TOKENS more

    def observe(self, decode_rows: int, prompt_tokens: int, seconds: float) -> None:
        """A step ran ``decode_rows`` decode rows and ``prompt_tokens`` prompt tokens in ``seconds``. Steps
        without decode rows hold no stream up and are not counted."""
        if decode_rows == 0:
            return
        keep = 1.0 - FORGET
        x = (1.0, float(decode_rows), float(prompt_tokens))
        for i in range(_N):
            self._xy[i] = keep * self._xy[i] + x[i] * seconds
            for j in range(_N):
                self._xx[i * _N + j] = keep * self._xx[i * _N + j] + x[i] * x[j]
        if self.token_s is not None or self._spread() >= MIN_SPREAD_TOKENS:
            self._fit()
        self._probe = self.token_s is None and not self._probe

    def _spread(self) -> float:
        """The (weighted) standard deviation of the prompt tokens of the steps in the fit."""
        weight, tokens, squares = self._xx[0], self._xx[2], self._xx[2 * _N + 2]  # sums of w, w t, w t^2
        mean = tokens / weight
        return max(squares / weight - mean * mean, 0.0) ** 0.5

    def _fit(self) -> None:
        """Solve the normal equations, each slope pulled towards its last estimate (the row slope towards
        0 before one: rows that never changed add nothing; the token slope not at all before one, its
        first mixed step measures it)."""
        a = list(self._xx)
        b = list(self._xy)
        for i, last in ((1, 0.0 if self.row_s is None else self.row_s), (2, self.token_s)):
            if last is None:
                continue
            pull = RIDGE * a[i * _N + i]
            a[i * _N + i] += pull
            b[i] += pull * last
        solved = _solve(a, b)
        if solved is None:
            return
        fixed, row, token = solved
        self.fixed_s, self.row_s, self.token_s = fixed, max(row, 0.0), max(token, 0.0)

    def decode_s(self, decode_rows: int) -> float | None:
        """What a step of ``decode_rows`` decode rows alone costs, by the fit (None: not measured yet)."""
        if self.fixed_s is None or self.row_s is None:
            return None
        return self.fixed_s + self.row_s * decode_rows

    def allowance(self, decode_rows: int) -> int:
        """Prompt tokens a step with ``decode_rows`` decode rows may take (all of them, not beyond the rows)."""
        least = min(self.ceiling, self.floor + decode_rows)
        decode_s = self.decode_s(decode_rows)
        if decode_s is None or self.token_s is None:
            return min(self.ceiling, least + PROBE_TOKENS) if self._probe else least
        if self.token_s <= 0.0:
            return self.ceiling
        allowed = (self.ratio - 1.0) * decode_s / self.token_s
        return max(least, min(self.ceiling, int(allowed + 1e-6)))  # (not 49 for 49.99999999)


def _solve(a: list[float], b: list[float]) -> list[float] | None:
    """``a x = b`` for a small square ``a`` (row-major) by Gaussian elimination with partial pivoting;
    None where ``a`` is singular."""
    n = len(b)
    tiny = 1e-12 * max(abs(a[i * n + i]) for i in range(n))
    m = [[*a[i * n : (i + 1) * n], b[i]] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) <= tiny:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x
