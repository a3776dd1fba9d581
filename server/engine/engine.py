"""AsyncEngine: requests in from asyncio, one engine thread running the model, token events back out.

The loop reads at a glance::

    result = scheduler.schedule(now)        # GenerationRequest state -> Batch
    output = runner.step(result.batch)      # Batch -> StepOutput
    self._postprocess(batch, output)        # StepOutput -> TokenEvents on each request's queue

Everything that touches the model happens on the engine thread. Submissions and aborts cross into it
through a lock-protected inbox; events cross back with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import AsyncIterator
from collections.abc import Sequence as SequenceABC
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.step_cost import StepCost
from server.engine.types import (
    AdapterLease,
    AdapterUnavailableError,
    Batch,
    ChatMessage,
    EngineError,
    EngineNotReadyError,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    Logprob,
    ModelRunner,
    PositionLogprobs,
    PromptTooLongError,
    QueueFullError,
    Sequence,
    StepFailedError,
    StepOutput,
    TokenEvent,
    TokenLogprobs,
    UnknownModelError,
)
from server.metrics import FinishedRequest, Metrics, SchedulerState

log = logging.getLogger("loraserve.engine")

IDLE_WAIT_S = 0.05  # how long the loop sleeps with nothing to run before housekeeping again


@dataclass(slots=True, frozen=True)
class EngineConfig:
    max_num_batched_tokens: int = 512  # tokens per step: decode rows first, then prompt chunks
    max_loras_per_batch: int = 8
    max_queue: int = 256
    # With nothing to run (no work, or every waiting sequence blocked on an adapter load) the loop waits
    # this long, or until a submit, an abort or a finished load wakes it, before it looks again.
    idle_wait_s: float = IDLE_WAIT_S
    enable_prefix_caching: bool = True
    # beside decode rows, prompt chunks take at most this many tokens plus one per decode row (None: the
    # whole budget; see server.engine.scheduler)
    prefill_beside_decode: int | None = None
    # set: the allowance is measured (server.engine.step_cost): as many prompt tokens as keep a step within
    # this many decode steps of the same decode rows, never fewer than the cap above
    prefill_step_ratio: float | None = None


@dataclass(slots=True)
class LoopStats:
    """Counters of the engine thread (written by it only; read by tests and benchmarks)."""

    iterations: int = 0  # passes of the loop
    waits: int = 0  # times it waited for news instead of iterating again
    cpu_s: float = 0.0  # CPU time the thread spent iterating (time.thread_time)


class RequestStream:
    """The token events of one or more requests submitted together (a prompt list, ``n`` choices), in
    order per request; ends after every request's event that carries ``finish_reason``."""

    def __init__(
        self,
        request_ids: list[str],
        prompt_token_ids: list[tuple[int, ...]],
        queue: asyncio.Queue[TokenEvent],
    ) -> None:
        self.request_ids = request_ids
        self.prompt_token_ids = prompt_token_ids
        self._queue = queue
        self._peeked: TokenEvent | None = None
        self._open = set(request_ids)

    @property
    def request_id(self) -> str:
        """The first request's id (the only one for ``submit``)."""
        return self.request_ids[0]

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of the first request."""
        return len(self.prompt_token_ids[0])

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self

    async def peek(self) -> TokenEvent:
        """The next event, left in place: iteration still returns it. Lets the API answer a failure that
        comes before any token (a cold adapter that cannot load) with a real HTTP status."""
        if self._peeked is None:
            self._peeked = await self._queue.get()
        return self._peeked

    async def __anext__(self) -> TokenEvent:
        if not self._open:
            raise StopAsyncIteration
        if self._peeked is not None:
            event, self._peeked = self._peeked, None
        else:
            event = await self._queue.get()
        if event.finished:
            self._open.discard(event.request_id)
        return event


@dataclass(slots=True)
class _Track:
    """Engine-thread bookkeeping of one live request."""

    seq: Sequence
    detok: IncrementalDetokenizer
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent]
    label: str
    prefill_computed: int = 0  # prompt tokens its prefill computed (the rest came from the prefix cache)


class AsyncEngine:
    """Continuous-batching engine over one ``ModelRunner``. ``submit`` from the event loop, iterate the
    returned stream; ``abort`` from anywhere."""

    def __init__(self, runner: ModelRunner, config: EngineConfig, metrics: Metrics | None = None) -> None:
        self.runner = runner
        self.config = config
        self.metrics = metrics
        self.model_id = runner.model_id
        self.max_model_len = runner.max_model_len
        kv = runner.kv_blocks
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_slots=runner.num_slots,
                max_model_len=runner.max_model_len,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_loras_per_batch=config.max_loras_per_batch,
                max_queue=config.max_queue,
                num_blocks=kv.num_blocks,
                block_size=kv.block_size,
                enable_prefix_caching=config.enable_prefix_caching,
                base_digest=kv.base_digest,
                prefill_beside_decode=config.prefill_beside_decode,
            ),
            acquire=self._acquire,
            release=runner.release_adapter,
        )
        self.step_cost: StepCost | None = None
        if config.prefill_step_ratio is not None:
            self.step_cost = StepCost(
                floor=config.prefill_beside_decode or 0,
                ceiling=config.max_num_batched_tokens,
                ratio=config.prefill_step_ratio,
            )
            self.scheduler.prompt_cap = self.step_cost.allowance
        self._cv = threading.Condition()
        self._inbox: list[Sequence] = []
        self._aborts: list[tuple[str, str]] = []
        self._tracks: dict[str, _Track] = {}  # engine thread only
        self._live_ids: set[str] = set()  # guarded by _cv
        self._num_waiting = 0  # waiting in the scheduler, refreshed by the loop
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self._woken = False  # guarded by _cv: wake() was called since the loop last looked
        self._rng = random.SystemRandom()
        self._reported = (0, 0, 0)  # prefix cache queries, hits, preemptions already counted
        if metrics is not None:
            metrics.seed(self.model_id)
        # Templating and tokenization of new requests run here, off the event loop; one thread, since a
        # Hugging Face tokenizer is not meant to be driven from several threads at once.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraserve-tokenize")
        self.stats = LoopStats()

    # ------------------------------------------------------------------------------------ life cycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="loraserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        """Make the loop look again now (any thread): an adapter load finished, say. The runner gets this
        as its wake-up call (``ModelRunner.set_wakeup``)."""
        with self._cv:
            self._woken = True
            self._cv.notify_all()

    async def drain(self, timeout: float) -> None:
        """Stop admitting (``submit`` raises ``EngineNotReadyError``), let live requests finish for up to
        ``timeout`` seconds, then abort the rest (finish_reason ``abort``)."""
        self._draining = True
        deadline = time.monotonic() + timeout
        while self.num_live and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        with self._cv:
            for request_id in self._live_ids:
                self._aborts.append((request_id, "shutdown"))
            self._cv.notify_all()
        deadline = time.monotonic() + 5.0
        while self.num_live and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def is_ready(self) -> bool:
        return self.is_alive and not self._draining

    @property
    def num_live(self) -> int:
        with self._cv:
            return len(self._live_ids)

    # ------------------------------------------------------------------------------------ models

    def adapter_names(self) -> list[str]:
        return self.runner.adapter_names()

    def has_adapter(self, name: str) -> bool:
        return self.runner.has_adapter(name)

    # ------------------------------------------------------------------------------------ requests

    async def add_requests(self, requests: SequenceABC[GenerationRequest]) -> RequestStream:
        """``submit_many`` with the chat templating and tokenization on the engine's tokenizer thread, so
        that a long prompt never holds up the event loop (the API's way in)."""
        loop = asyncio.get_running_loop()
        try:
            seqs = await loop.run_in_executor(
                self._tokenize_pool, lambda: [self._to_sequence(r) for r in requests]
            )
        except EngineError as invalid:
            self._count_rejection(invalid, self.model_id)
            raise
        return self._enqueue(seqs)

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate and enqueue ``request``; raise an ``EngineError`` before any token if it cannot run.
        Must be called on the event loop that will consume the stream; tokenizes on the calling thread
        (``add_requests`` does not)."""
        return self.submit_many([request])

    def submit_many(self, requests: SequenceABC[GenerationRequest]) -> RequestStream:
        """Validate and enqueue ``requests`` together (they reach the scheduler in the same step, so they
        prefill and decode in the same batches), all or none; one stream carries all their events."""
        try:
            seqs = [self._to_sequence(request) for request in requests]
        except EngineError as invalid:
            self._count_rejection(invalid, self.model_id)
            raise
        return self._enqueue(seqs)

    def _enqueue(self, seqs: list[Sequence]) -> RequestStream:
        if not seqs:
            raise InvalidRequestError("nothing to generate", param="prompt")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        tracks = [self._new_track(seq, loop, queue) for seq in seqs]
        ids = [seq.request_id for seq in seqs]
        with self._cv:
            if not self.is_ready:
                refusal: EngineError = EngineNotReadyError(
                    "the server is not accepting requests (starting or draining)"
                )
            elif any(rid in self._live_ids for rid in ids) or len(set(ids)) != len(ids):
                refusal = InvalidRequestError(f"request id {ids[0]!r} is already in use")
            elif self._num_waiting + len(self._inbox) + len(seqs) > self.config.max_queue:
                refusal = QueueFullError(f"{self.config.max_queue} requests are waiting; retry shortly")
            else:
                for seq, track in zip(seqs, tracks, strict=True):
                    self._live_ids.add(seq.request_id)
                    self._tracks[seq.request_id] = track
                    self._inbox.append(seq)
                    if self.metrics is not None and seq.adapter is not None:
                        self.metrics.adapter_requests_total.labels(adapter=track.label).inc()
                self._cv.notify_all()
                prompts = [tuple(seq.token_ids[: seq.num_prompt_tokens]) for seq in seqs]
                return RequestStream(ids, prompts, queue)
        self._count_rejection(refusal, tracks[0].label)
        raise refusal

    def _new_track(
        self, seq: Sequence, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[TokenEvent]
    ) -> _Track:
        sampling = seq.sampling
        detok = IncrementalDetokenizer(
            self.runner.tokenizer,
            seq.token_ids[: seq.num_prompt_tokens],
            sampling.stop,
            skip_special_tokens=sampling.skip_special_tokens,
            spaces_between_special_tokens=sampling.spaces_between_special_tokens,
            include_stop_str_in_output=sampling.include_stop_str_in_output,
            keep_special_token_ids=sampling.keep_special_token_ids,
        )
        label = self.model_id if seq.adapter is None else seq.adapter
        if self.metrics is not None:
            label = self.metrics.adapter_label(label)
        return _Track(seq=seq, detok=detok, loop=loop, queue=queue, label=label)

    # ------------------------------------------------------------------------------------ tokenizer

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """``/tokenize``: the ids the base's tokenizer (every adapter's) gives ``text``."""
        return self.runner.tokenizer.encode_plain(text, add_special_tokens=add_special_tokens)

    def tokenize_chat(self, messages: SequenceABC[ChatMessage]) -> list[int]:
        """``/tokenize`` of a conversation: the chat prompt the engine would run."""
        return self.runner.tokenizer.encode_chat(messages)

    def detokenize(self, token_ids: SequenceABC[int], *, skip_special_tokens: bool = True) -> str:
        """``/detokenize`` and echo of token-id prompts. Raises ``InvalidRequestError`` for an id outside
        the vocabulary."""
        self._check_token_ids(token_ids, "tokens")
        return self.runner.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_texts(self, token_ids: SequenceABC[int]) -> list[str]:
        """The text of each token alone (special tokens shown)."""
        tokenizer = self.runner.tokenizer
        return [tokenizer.token_text(t) for t in token_ids]

    def _check_token_ids(self, token_ids: SequenceABC[int], param: str) -> None:
        vocab = self.runner.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"{param}: token ids must be integers in [0, {vocab})", param=param)

    def abort(self, request_id: str, reason: str = "disconnect") -> None:
        """Abort a live request (idempotent, any thread). Its row is freed before the next step."""
        with self._cv:
            if request_id in self._live_ids:
                self._aborts.append((request_id, reason))
                self._cv.notify_all()

    def _to_sequence(self, request: GenerationRequest) -> Sequence:
        if request.adapter is not None and not self.runner.has_adapter(request.adapter):
            raise UnknownModelError(f"the model {request.adapter!r} does not exist", param="model")
        tokenizer = self.runner.tokenizer
        if request.messages is not None:
            prompt_ids = tokenizer.encode_chat(request.messages, request.tools)
            param = "messages"
        elif isinstance(request.prompt, str):
            prompt_ids = tokenizer.encode(request.prompt)
            param = "prompt"
        else:
            prompt_ids = list(request.prompt or [])
            param = "prompt"
            self._check_token_ids(prompt_ids, param)
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param=param)
        sampling = request.sampling
        for name, ids in (
            ("logit_bias", [t for t, _ in sampling.logit_bias]),
            ("stop_token_ids", sampling.stop_token_ids),
        ):
            if any(t >= self.runner.vocab_size for t in ids):
                raise InvalidRequestError(
                    f"{name}: token ids must be below the vocabulary size {self.runner.vocab_size}",
                    param=name,
                )
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.max_model_len}",
                param=param,
            )
        if sampling.max_tokens is None:  # omitted: the endpoint's default, never past the context (vLLM)
            room = self.max_model_len - len(prompt_ids)
            default = request.default_max_tokens
            sampling = replace(sampling, max_tokens=room if default is None else min(default, room))
        max_tokens = sampling.max_tokens or 0
        if sampling.min_tokens > max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({sampling.min_tokens}) exceeds the room left after the prompt ({max_tokens})",
                param="min_tokens",
            )
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds this model's "
                f"context of {self.max_model_len} tokens",
                param="max_tokens",
            )
        seed = sampling.seed if sampling.seed is not None else self._rng.getrandbits(63)
        return Sequence(
            request_id=request.request_id,
            token_ids=prompt_ids,
            num_prompt_tokens=len(prompt_ids),
            sampling=sampling,
            adapter=request.adapter,
            seed=seed,
            tenant=request.tenant,
            arrival_time=request.arrival_time,
            constraint=request.constraint,
        )

    def _count_rejection(self, exc: EngineError, label: str) -> None:
        if self.metrics is not None:
            self.metrics.on_rejected(exc.code, label)

    # ------------------------------------------------------------------------------------ the loop

    def _run(self) -> None:
        log.info("engine loop started (%d slots, context %d)", self.runner.num_slots, self.max_model_len)
        self.runner.bind_thread()
        self.runner.set_wakeup(self.wake)
        progressed = False
        while True:
            with self._cv:
                if self._stopping:
                    break
                # Wait unless there is news or the last iteration ran something: with every waiting
                # sequence blocked on an adapter load, iterating again could only spin.
                if not (self._inbox or self._aborts or self._woken or progressed):
                    self.stats.waits += 1
                    self._cv.wait(self.config.idle_wait_s)
                self._woken = False
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            self.stats.iterations += 1
            t0 = time.thread_time()
            try:
                progressed = self._iterate(inbox, aborts)
            except Exception as exc:  # the loop must survive anything a step or a hook throws
                log.exception("engine iteration failed")
                self._fail_all(StepFailedError(f"the engine failed: {type(exc).__name__}: {exc}"))
                progressed = False
            self.stats.cpu_s += time.thread_time() - t0
        log.info("engine loop stopped")

    def _iterate(self, inbox: list[Sequence], aborts: list[tuple[str, str]]) -> bool:
        """One pass: take in submissions and aborts, schedule, run a step. True if it ran a step or
        finished a sequence (then the next pass may have work at once)."""
        for seq in inbox:
            self.scheduler.waiting.append(seq)
        for request_id, reason in aborts:
            self._abort_now(request_id, reason)
        try:
            self.runner.housekeeping()
        except Exception:
            log.exception("runner housekeeping failed")
        now = time.monotonic()
        result = self.scheduler.schedule(now)
        for seq, exc in result.failed:
            self._finish(seq, FinishReason.ERROR, error=exc)
        batch = result.batch
        progressed = bool(result.failed or aborts or result.preempted)
        if batch is not None:
            progressed = True
            try:
                started = time.perf_counter()
                output = self.runner.step(batch)
                self._measure(batch, time.perf_counter() - started)
                self._postprocess(batch, output)
            except Exception as exc:
                # a step or its post-processing failed: every row of the batch still running ends here,
                # with an error event, so that no client waits for a token that will never come
                log.exception("%s step of %d sequences failed", batch.kind, len(batch))
                error = StepFailedError(f"the model step failed: {type(exc).__name__}: {exc}")
                for seq in batch.seqs:
                    if not seq.is_finished:
                        self._finish(seq, FinishReason.ERROR, error=error)
        self._num_waiting = len(self.scheduler.waiting)
        self._update_gauges()
        return progressed

    def _measure(self, batch: Batch, seconds: float) -> None:
        """Feed a step's cost to ``step_cost`` (the scheduler asks it for the next step's allowance)."""
        if self.step_cost is not None:
            self.step_cost.observe(batch.num_decode_rows, batch.num_prefill_tokens, seconds)

    def _fail_all(self, error: EngineError) -> None:
        """After an unexpected failure outside a step: end every live request with ``error`` (the
        scheduler's state can no longer be trusted to finish them normally)."""
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            try:
                self._finish(seq, FinishReason.ERROR, error=error)
            except Exception:
                log.exception("finishing %s after an engine failure failed", seq.request_id)
        for request_id, track in list(self._tracks.items()):  # whatever the scheduler no longer held
            del self._tracks[request_id]
            with self._cv:
                self._live_ids.discard(request_id)
            seq = track.seq
            event = TokenEvent(
                request_id,
                "",
                (),
                seq.num_prompt_tokens,
                seq.num_output_tokens,
                finish_reason=FinishReason.ERROR,
                error=error,
            )
            self._emit(track, event)

    def _postprocess(self, batch: Batch, output: StepOutput) -> None:
        """StepOutput -> TokenEvents, finishing sequences that hit EOS, a stop token or string, or a length
        limit. As vLLM, the text of the token that stops a sequence (EOS or a stop token id) is left out
        unless ``include_stop_str_in_output``; its logprobs are reported either way."""
        now = time.monotonic()
        eos = self.runner.tokenizer.eos_token_ids
        m = self.metrics
        if m is not None:  # before any event goes out: a client that has its answer finds it counted
            # vLLM's iteration tokens: prompt tokens computed plus tokens sampled
            m.on_step(self.model_id, batch.num_prefill_tokens + len(output.token_ids))
        sampled = iter(range(len(output.token_ids)))  # StepOutput rows: the batch's sampling rows
        for i, seq in enumerate(batch.seqs):
            prefill, samples = batch.is_prefill(i), batch.samples(i)
            seq.num_cached += batch.num_new_tokens[i]
            if not samples:  # a prompt chunk short of the end: nothing to say yet
                continue
            k = next(sampled)
            token = output.token_ids[k]
            track = self._tracks[seq.request_id]
            computed = seq.num_prompt_tokens - seq.num_prefix_cached
            first_event = seq.num_output_tokens == 0
            prompt_logprobs = self._prompt_logprobs(output, i) if prefill and first_event else None
            if seq.sampling.max_tokens == 0:  # a prefill for prompt logprobs (echo) only: no output token
                self._finish(seq, FinishReason.LENGTH, prompt_logprobs=prompt_logprobs)
                continue
            seq.token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
                track.prefill_computed = computed
                if m is not None:
                    m.on_first_token(track.label, now - seq.arrival_time, seq.num_prompt_tokens, computed)
            elif m is not None and seq.last_token_time is not None:
                m.on_next_token(track.label, now - seq.last_token_time)
            seq.last_token_time = now
            if seq.aborted:
                self._finish(seq, FinishReason.ABORT)
                continue
            sampling = seq.sampling
            logprobs = self._token_logprobs(output, k)
            if (token in eos and not sampling.ignore_eos) or token in sampling.stop_token_ids:
                text = track.detok.add(token) if sampling.include_stop_str_in_output else ""
                self._finish(
                    seq,
                    FinishReason.STOP,
                    text=text + track.detok.flush(),
                    last_token=token,
                    logprobs=logprobs,
                    prompt_logprobs=prompt_logprobs,
                )
                continue
            text = track.detok.add(token)
            if track.detok.stopped:
                self._finish(
                    seq,
                    FinishReason.STOP,
                    text=text,
                    last_token=token,
                    logprobs=logprobs,
                    prompt_logprobs=prompt_logprobs,
                )
            elif seq.constraint is not None and not seq.constraint.accept(token):
                # The mask offers only tokens the grammar consumes, so a refused token means it offered none:
                # the grammar needs text this vocabulary cannot spell. Never unconstrained text: a 400.
                param = seq.constraint.param
                error = InvalidRequestError(
                    f"{param}: the output grammar cannot continue with this model's tokens", param=param
                )
                self._finish(seq, FinishReason.ERROR, error=error)
            elif seq.constraint is not None and seq.constraint.is_complete:  # nothing may follow: done
                self._finish(
                    seq,
                    FinishReason.STOP,
                    text=text + track.detok.flush(),
                    last_token=token,
                    logprobs=logprobs,
                    prompt_logprobs=prompt_logprobs,
                )
            elif seq.num_output_tokens >= (sampling.max_tokens or 0) or seq.num_tokens >= self.max_model_len:
                self._finish(
                    seq,
                    FinishReason.LENGTH,
                    text=text + track.detok.flush(),
                    last_token=token,
                    logprobs=logprobs,
                    prompt_logprobs=prompt_logprobs,
                )
            else:
                self._emit(
                    track,
                    TokenEvent(
                        seq.request_id,
                        text,
                        (token,),
                        seq.num_prompt_tokens,
                        seq.num_output_tokens,
                        logprobs=logprobs,
                        prompt_logprobs=prompt_logprobs,
                        cached_tokens=seq.num_prefix_cached,
                    ),
                )

    def _token_logprobs(self, output: StepOutput, row: int) -> tuple[TokenLogprobs, ...]:
        entry = output.logprobs[row] if output.logprobs else None
        return () if entry is None else (self._with_text(entry),)

    def _prompt_logprobs(self, output: StepOutput, row: int) -> tuple[TokenLogprobs | None, ...] | None:
        entries = output.prompt_logprobs[row] if output.prompt_logprobs else None
        if entries is None:
            return None
        return (None, *(self._with_text(e) for e in entries))  # nothing predicts the first prompt token

    def _with_text(self, entry: PositionLogprobs) -> TokenLogprobs:
        # PositionLogprobs (ids) -> TokenLogprobs (with each token's text), for the rows that asked only
        text = self.runner.tokenizer.token_text
        return TokenLogprobs(
            chosen=Logprob(entry.token_id, text(entry.token_id), entry.logprob),
            rank=entry.rank,
            top=tuple(Logprob(t, text(t), v) for t, v in zip(entry.top_ids, entry.top_logprobs, strict=True)),
        )

    def _abort_now(self, request_id: str, reason: str) -> None:
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return
        if self.metrics is not None:
            self.metrics.requests_aborted_total.labels(reason=reason).inc()
        seq.abort_reason = reason
        self._finish(seq, FinishReason.ABORT)

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        *,
        text: str = "",
        last_token: int | None = None,
        error: EngineError | None = None,
        logprobs: tuple[TokenLogprobs, ...] = (),
        prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None,
    ) -> None:
        slot = seq.slot
        track = self._tracks.pop(seq.request_id, None)
        with self._cv:
            self._live_ids.discard(seq.request_id)
        try:
            self.scheduler.finish(seq, reason)
            if slot >= 0:
                self.runner.free_slot(slot)
        finally:  # the client hears of the end whatever freeing the row or counting it does
            if track is not None:
                try:
                    self._record_finish(seq, track, reason, error)  # first: a client's answer is counted
                finally:
                    final = self._final_event(seq, reason, text, last_token, error, logprobs, prompt_logprobs)
                    self._emit(track, final)

    @staticmethod
    def _final_event(
        seq: Sequence,
        reason: FinishReason,
        text: str,
        last_token: int | None,
        error: EngineError | None,
        logprobs: tuple[TokenLogprobs, ...] = (),
        prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None,
    ) -> TokenEvent:
        return TokenEvent(
            seq.request_id,
            text,
            () if last_token is None else (last_token,),
            seq.num_prompt_tokens,
            seq.num_output_tokens,
            finish_reason=reason,
            error=error,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            cached_tokens=seq.num_prefix_cached,
        )

    def _record_finish(
        self, seq: Sequence, track: _Track, reason: FinishReason, error: EngineError | None
    ) -> None:
        now = time.monotonic()
        latency = now - seq.arrival_time
        # the API logs each request once at info level (with tenant and disconnects); this is the engine's view
        log.debug(
            "sequence finished",
            extra={
                "request_id": seq.request_id,
                "tenant": seq.tenant,
                "adapter": seq.adapter,
                "prompt_tokens": seq.num_prompt_tokens,
                "completion_tokens": seq.num_output_tokens,
                "latency_s": round(latency, 4),
                "finish_reason": reason.value,
                "error": None if error is None else error.message,
            },
        )
        if self.metrics is None:
            return
        # Sequence -> FinishedRequest (n is 1)
        self.metrics.on_finished(
            FinishedRequest(
                model_name=track.label,
                finished_reason=reason.value,
                arrival=seq.arrival_time,
                scheduled=seq.first_scheduled_time,
                first_token=seq.first_token_time,
                last_token=seq.last_token_time,
                finished=now,
                prompt_tokens=seq.num_prompt_tokens,
                generation_tokens=seq.num_output_tokens,
                max_tokens=(
                    self.max_model_len - seq.num_prompt_tokens
                    if seq.sampling.max_tokens is None
                    else seq.sampling.max_tokens
                ),  # omitted: up to the rest of the context
                prefill_computed_tokens=track.prefill_computed,
                num_preemptions=seq.num_preemptions,
            )
        )

    def _emit(self, track: _Track, event: TokenEvent) -> None:
        # a closed consumer loop (RuntimeError) means nobody is listening any more
        with contextlib.suppress(RuntimeError):
            track.loop.call_soon_threadsafe(track.queue.put_nowait, event)

    def _acquire(self, adapter: str) -> AdapterLease | None:
        try:
            return self.runner.acquire_adapter(adapter)
        except EngineError:
            raise
        except Exception as exc:  # a runner bug must fail the request, not the loop
            log.exception("acquiring adapter %s failed", adapter)
            raise AdapterUnavailableError(
                f"adapter {adapter!r} could not be loaded: {exc}", status=500
            ) from exc

    def _update_gauges(self) -> None:
        if self.metrics is None:
            return
        scheduler = self.scheduler
        stats = scheduler.prefix_cache_stats
        totals = (stats.queries, stats.hits, scheduler.num_preemptions)
        queries, hits, preemptions = (
            now - before for now, before in zip(totals, self._reported, strict=True)
        )
        self._reported = totals
        self.metrics.on_engine_counters(self.model_id, queries, hits, preemptions)
        state = SchedulerState(
            running=len(scheduler.running),
            waiting=len(scheduler.waiting),
            waiting_deferred=scheduler.num_deferred,
            kv_cache_usage=scheduler.kv_cache_usage,
            max_lora=self.config.max_loras_per_batch,
            running_adapters=frozenset(scheduler.running_adapters()),
            waiting_adapters=frozenset(scheduler.waiting_adapters()),
        )
        self.metrics.set_scheduler_state(self.model_id, state, time.time())
