"""How many prompt tokens a step may take beside decode rows, from what the last steps cost. Torch-free.

A step that computes prompt tokens beside decode rows holds every decoding stream's next token up for
as long as it runs, so the prompt tokens it takes decide the inter-token latency's tail; too few starve
admission instead (a chat turn's uncached tail waits for many steps). What a prompt token costs depends on
the machine: measured with 16 base streams of the 193M Llama on 2 cores, about 1/60 of a decode step in
float32 on an AMD EPYC Zen 4 (1.9 ms against about 120 ms), but about 1/100 in bf16 on an Intel Xeon with
AMX (0.47 ms against about 50 ms). A fixed cap of 16 tokens plus one per decode row kept the Xeon's inter-token p99 at
1.5x its median but raised the mean TTFT of chat turns 2-4 from 0.45 s (no cap) to 4.2 s; a cap of 64 gave
1.0 s at 2.0x.

So ``StepCost`` measures both: the seconds of steps of decode rows alone and the seconds a prompt token
adds to such a step (each an exponential average over the last steps), and allows as many prompt tokens
beside decode rows as keep a step within ``ratio`` decode steps, never fewer than ``floor`` (until both
are measured: ``floor``).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_RATIO = 1.6  # a step with prompt tokens may take this many decode steps
WEIGHT = 1 / 16  # of each new step in the averages
MIN_SAMPLE_TOKENS = 8  # fewer prompt tokens than this say more about noise than about their cost


@dataclass(slots=True)
class StepCost:
    """The running estimate; ``observe`` every step, ``beside`` the allowance for the next."""

    floor: int  # prompt tokens allowed beside decode rows before and whatever the estimate
    ceiling: int  # never more (the step's token budget)
    ratio: float = DEFAULT_RATIO
    decode_s: float | None = None  # a step of decode rows alone
    token_s: float | None = None  # what one prompt token adds to such a step
    rows: float | None = None  # decode rows per step (the scheduler allows one prompt token more for each)

    def observe(self, decode_rows: int, prompt_tokens: int, seconds: float) -> None:
        """A step ran ``decode_rows`` decode rows and ``prompt_tokens`` prompt tokens in ``seconds``. Steps
        without decode rows hold no stream up and are not counted."""
        if decode_rows == 0:
            return
        self.rows = _average(self.rows, float(decode_rows))
        if prompt_tokens == 0:
            self.decode_s = _average(self.decode_s, seconds)
        elif self.decode_s is not None and prompt_tokens >= MIN_SAMPLE_TOKENS:
            added = max(seconds - self.decode_s, 0.0) / prompt_tokens
            self.token_s = _average(self.token_s, added)

    def beside(self) -> int:
        """Prompt tokens the next step may take beside its decode rows (the scheduler adds one per row)."""
        if self.decode_s is None or self.token_s is None or self.rows is None:
            return self.floor
        if self.token_s <= 0.0:
            return self.ceiling
        allowed = (self.ratio - 1.0) * self.decode_s / self.token_s - self.rows
        return max(self.floor, min(self.ceiling, int(allowed)))


def _average(current: float | None, sample: float) -> float:
    return sample if current is None else current + WEIGHT * (sample - current)
