"""Incremental detokenization of one request's output, with stop strings. No torch.

Decoding token by token must never release half a UTF-8 character: a byte-level BPE token may carry only
part of one, and decoding it alone yields U+FFFD. The prefix/read-offset technique (TGI, vLLM) decodes a
small window of tokens twice, with and without the newest tokens, and releases the difference only once it
no longer ends in U+FFFD. The window starts with a few prompt tokens, so a tokenizer that drops the leading
space of the first token it decodes (SentencePiece) still puts the space between prompt and completion.

With a byte-level tokenizer (``Tokenizer.byte_level``) only the last U+FFFD of a decoded text can still
become a character: the text before it is released at once, so a run of invalid bytes (random weights
sample them often) streams one U+FFFD a token rather than all of them when the run ends. Other tokenizers
(SentencePiece's byte fallback shows every byte of an unfinished run as U+FFFD) wait for the whole text.

The wait is bounded: a character's UTF-8 bytes span at most four tokens, so text that still ends in U+FFFD
after ``MAX_PENDING_TOKENS`` unreleased tokens ends in bytes that are not UTF-8 at all (a model can emit
such tokens forever). They are released as U+FFFD, as decoding the whole output would show them, and the
window restarts; without the bound every token re-decodes a window that keeps growing (quadratic).

Stop strings are matched on the released text: any suffix that could still grow into a stop string is held
back, and when one appears the text before it is released and the rest, the stop string included, never is
(the stop string itself is, with vLLM's ``include_stop_str_in_output``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from server.engine.types import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded ahead of the output for context (vLLM uses 5 too).
PROMPT_CONTEXT_TOKENS = 5
# Unreleased tokens after which trailing U+FFFD is taken to be invalid bytes, not a character in progress.
MAX_PENDING_TOKENS = 8


class IncrementalDetokenizer:
    """Turns one request's output tokens, one at a time, into text that is safe to send now.

    ``add`` returns the newly releasable text (often ""), ``stopped`` turns true when a stop string
    matched, and ``flush`` releases what was held back when the request finishes for another reason.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
        keep_special_token_ids: Collection[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._byte_level = tokenizer.byte_level
        # decode options travel only when they differ from the defaults (the protocol's minimal decode)
        self._skip_special = skip_special_tokens
        self._spaces_between_special = spaces_between_special_tokens
        # a tool parser's markers: shown although the other special tokens are skipped
        self._keep = frozenset(keep_special_token_ids) if skip_special_tokens else frozenset()
        self._stop = tuple(s for s in stop if s)
        self._include_stop = include_stop_str_in_output
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        prefix_text = self._decode_ids(context) if context else ""
        if prefix_text.endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character; its completion would be split between prompt and output
            # text. Decode the output on its own instead, as `decode(output_ids)` would.
            context, prefix_text = [], ""
        # `_window` holds the tokens from the prefix offset on; `_window[:_read_offset]` decodes to
        # `_prefix_text`, and the tokens after it have not been released yet.
        self._window: list[int] = context
        self._read_offset = len(context)
        self._prefix_text = prefix_text
        self._early = ""  # text of the unreleased tokens released ahead of them (byte-level: before a U+FFFD)
        self._held = ""  # decoded text held back because it may be the start of a stop string
        self._released: list[str] = []
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """A stop string matched: the text before it was released, nothing after it will be."""
        return self._stopped

    @property
    def text(self) -> str:
        """All text released so far."""
        return "".join(self._released)

    def add(self, token_id: int) -> str:
        """Append one output token; return the text that can be released now (may be "")."""
        if self._stopped:
            return ""
        self._window.append(token_id)
        new_text = self._decode_ids(self._window)
        pending = len(self._window) - self._read_offset
        if new_text.endswith(REPLACEMENT_CHAR) and pending < MAX_PENDING_TOKENS:
            # an incomplete character: wait for the tokens that finish it (byte-level: that U+FFFD only)
            if not self._byte_level:
                return ""
            settled = new_text[len(self._prefix_text) + len(self._early) : -1]
            self._early += settled
            return self._release(settled)
        return self._release(self._advance(new_text))

    def flush(self) -> str:
        """At finish (not stopped): release everything held back, incomplete characters included."""
        if self._stopped:
            return ""
        tail = ""
        if self._read_offset < len(self._window):
            tail = self._advance(self._decode_ids(self._window))
        out = self._release(tail)
        if not self._stopped:
            out += self._held
            self._released.append(self._held)
            self._held = ""
        return out

    def _advance(self, new_text: str) -> str:
        """The window decoded to ``new_text``: return its unreleased part and move both offsets on."""
        delta = new_text[len(self._prefix_text) + len(self._early) :]
        self._early = ""
        self._window = self._window[self._read_offset :]
        self._read_offset = len(self._window)
        self._prefix_text = self._decode_ids(self._window)
        return delta

    def _decode_ids(self, token_ids: Sequence[int]) -> str:
        if not self._skip_special:
            return self._tokenizer.decode(
                token_ids,
                skip_special_tokens=False,
                spaces_between_special_tokens=self._spaces_between_special,
            )
        if self._keep:
            return self._tokenizer.decode(token_ids, keep_special_token_ids=self._keep)
        return self._tokenizer.decode(token_ids)

    def _release(self, delta: str) -> str:
        """Pass decoded text through the stop-string check; record and return what may be sent."""
        if not self._stop:
            if delta:
                self._released.append(delta)
            return delta
        # Released text never ends with the start of a stop string, so a match lies within `candidate`.
        candidate = self._held + delta
        matches = [(i, len(s)) for i, s in ((candidate.find(s), s) for s in self._stop) if i >= 0]
        if matches:
            at, length = min(matches)
            out = candidate[: at + length] if self._include_stop else candidate[:at]
            self._held = ""
            self._stopped = True
        else:
            keep = self._stop_prefix_length(candidate)
            out = candidate[: len(candidate) - keep]
            self._held = candidate[len(candidate) - keep :]
        if out:
            self._released.append(out)
        return out

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            # Only suffixes shorter than the stop string and starting with its first character qualify.
            start = text.find(stop[0], max(0, len(text) - len(stop) + 1))
            while start >= 0:
                if stop.startswith(text[start:]):
                    longest = max(longest, len(text) - start)
                    break  # later starts give shorter suffixes
                start = text.find(stop[0], start + 1)
        return longest
