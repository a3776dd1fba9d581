"""IncrementalDetokenizer against a real byte-level BPE tokenizer trained here, and a SentencePiece-like toy."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from server.engine.detokenizer import MAX_PENDING_TOKENS, PROMPT_CONTEXT_TOKENS, IncrementalDetokenizer
from server.engine.types import ChatMessage

TRAINING_TEXT = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Café crème brûlée, naïve résumé, Ångström, façade, jalapeño.",
    "日本語のテキストです。中文文本。한국어 텍스트.",
    "Emoji: 😀 🎉 👍🏽 ❤️ and more emoji 😀😀.",
    "STOP here. The end. ### Answer: 42",
]

TEXTS = [
    "Hello world!",
    "Hello world! The quick brown fox.",
    "Café crème brûlée",
    "naïve résumé façade",
    "日本語のテキスト",
    "中文文本和日本語",
    "😀 🎉 👍🏽",
    "rare glyphs: 🚀✨🦀 ẞ ǅ \U0001d518\U0001d52b\U0001d526",  # not in training: split into single-byte tokens
    "mixed: Ångström 42 😀 日本 ok",
    "  leading and trailing spaces  ",
    "a",
    "",
]


class ByteLevelTokenizer:
    """The engine's ``Tokenizer`` protocol over a ``tokenizers`` byte-level BPE; ``byte_level`` False makes
    the detokenizer treat it as it treats any other tokenizer."""

    def __init__(self, tokenizer: HFTokenizer, *, byte_level: bool = True) -> None:
        self._tokenizer = tokenizer
        self.byte_level = byte_level
        self.decoded_lengths: list[int] = []

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset()

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text).ids)

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self.encode("\n".join(f"{m.role}: {m.content}" for m in messages))

    def decode(self, token_ids: Sequence[int]) -> str:
        self.decoded_lengths.append(len(token_ids))
        return self._tokenizer.decode(list(token_ids))


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(TRAINING_TEXT * 4, trainer)
    return bpe


@pytest.fixture(params=[True, False], ids=["byte-level", "waits-for-whole-text"])
def tokenizer(bpe: HFTokenizer, request: pytest.FixtureRequest) -> ByteLevelTokenizer:
    return ByteLevelTokenizer(bpe, byte_level=request.param)


def _stream(detok: IncrementalDetokenizer, ids: Sequence[int]) -> list[str]:
    pieces = [detok.add(i) for i in ids]
    return [*pieces, detok.flush()]


def test_the_tokenizer_really_splits_characters(tokenizer: ByteLevelTokenizer) -> None:
    ids = tokenizer.encode("rare glyphs: 🚀✨🦀")
    assert any(tokenizer.decode(ids[:n]).endswith("\ufffd") for n in range(len(ids)))


@pytest.mark.parametrize("text", TEXTS)
def test_released_text_equals_full_decode_at_every_prompt_split(
    tokenizer: ByteLevelTokenizer, text: str
) -> None:
    ids = tokenizer.encode("Prompt: " + text)
    for split in range(len(ids) + 1):
        prompt, output = ids[:split], ids[split:]
        detok = IncrementalDetokenizer(tokenizer, prompt)
        pieces = _stream(detok, output)
        if not tokenizer.decode(prompt).endswith("\ufffd"):
            assert all("\ufffd" not in p for p in pieces), (split, pieces)
        assert "".join(pieces) == detok.text == tokenizer.decode(output)
        assert not detok.stopped


@pytest.mark.parametrize("text", TEXTS)
def test_releases_each_character_as_soon_as_it_is_complete(tokenizer: ByteLevelTokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [])
    for n, token_id in enumerate(ids, start=1):
        detok.add(token_id)
        prefix = tokenizer.decode(ids[:n])
        if not prefix.endswith("\ufffd"):
            assert detok.text == prefix
    assert detok.flush() == ""


def test_decodes_a_small_window_not_the_whole_output(tokenizer: ByteLevelTokenizer) -> None:
    ids = tokenizer.encode(" ".join(TRAINING_TEXT) * 3)
    assert len(ids) > 300
    tokenizer.decoded_lengths.clear()
    detok = IncrementalDetokenizer(tokenizer, ids[:50])
    _stream(detok, ids[50:])
    assert max(tokenizer.decoded_lengths) <= 8
    assert detok.text == tokenizer.decode(ids[50:])


def _lone_byte_token(tokenizer: ByteLevelTokenizer, byte: int) -> int:
    """The id of the token that is the single byte ``byte`` (byte-level BPE has one for each byte)."""
    token_id = tokenizer._tokenizer.token_to_id(_byte_chars()[byte])
    assert token_id is not None
    return int(token_id)


def _byte_chars() -> list[str]:
    # GPT-2's byte -> printable character table, which ByteLevel uses
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def test_text_ending_in_invalid_bytes_keeps_the_window_bounded(tokenizer: ByteLevelTokenizer) -> None:
    # 0xE2 opens a three-byte character; a model repeating it never completes one, and every decode ends
    # in U+FFFD. The window must not grow with the output (it did: one token longer per token, quadratic).
    lead = _lone_byte_token(tokenizer, 0xE2)
    ids = [lead] * 400
    assert tokenizer.decode(ids).endswith("\ufffd")
    tokenizer.decoded_lengths.clear()
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Prompt: "))
    pieces = _stream(detok, ids)
    assert len(tokenizer.decoded_lengths) >= len(ids)
    # the window: the released tokens kept as prefix (prompt context or the last release) + the pending ones
    bound = max(PROMPT_CONTEXT_TOKENS, MAX_PENDING_TOKENS) + MAX_PENDING_TOKENS
    assert max(tokenizer.decoded_lengths) <= bound
    assert "".join(pieces) == detok.text == tokenizer.decode(ids)


def test_a_character_completed_within_the_bound_is_still_whole(tokenizer: ByteLevelTokenizer) -> None:
    # invalid lead bytes, then a real three-byte character (U+2728) byte by byte: released whole
    ids = [_lone_byte_token(tokenizer, b) for b in (0xE2, 0xE2, 0xE2, 0x9C, 0xA8)]
    detok = IncrementalDetokenizer(tokenizer, [])
    assert "".join(_stream(detok, ids)) == tokenizer.decode(ids)
    assert detok.text.endswith("\u2728")


def test_a_byte_level_tokenizer_streams_invalid_bytes_one_a_token(bpe: HFTokenizer) -> None:
    # four lead bytes that nothing continues, then "A": each lead byte is known to be invalid (a U+FFFD for
    # good) once the next byte arrives, so a byte-level stream releases it then, not when the run ends
    byte_level, other = ByteLevelTokenizer(bpe), ByteLevelTokenizer(bpe, byte_level=False)
    ids = [_lone_byte_token(byte_level, b) for b in (0xE2, 0xE2, 0xE2, 0xE2, ord("A"))]
    assert _stream(IncrementalDetokenizer(byte_level, []), ids) == [
        "",
        "\ufffd",
        "\ufffd",
        "\ufffd",
        "\ufffdA",
        "",
    ]
    assert _stream(IncrementalDetokenizer(other, []), ids) == ["", "", "", "", "\ufffd" * 4 + "A", ""]


def _random_bytes_stream(tokenizer: ByteLevelTokenizer, rng: random.Random) -> list[int]:
    """Runs of 1-5 lone bytes (lead and continuation bytes, whole characters split byte by byte), each
    followed by a token of whole characters: what a random-weight model samples. Runs stay under the bound,
    past which a character still in progress is released as U+FFFD."""
    runs = [[0xE2], [0x9C], [0xF0, 0x9F], [0xE2, 0x9C, 0xA8], [0xC3, 0xA9], [0xF0, 0x9F, 0x98, 0x80], [0x80]]
    size = tokenizer._tokenizer.get_vocab_size()
    whole = [i for i in range(size) if "\ufffd" not in tokenizer.decode([i]) and tokenizer.decode([i])]
    ids: list[int] = []
    for _ in range(12):
        run: list[int] = []
        while not run or (len(run) < 5 and rng.random() < 0.6):
            run += rng.choice(runs)
        ids += [_lone_byte_token(tokenizer, b) for b in run[:5]]
        ids.append(rng.choice(whole))
    return ids


@pytest.mark.parametrize("seed", range(20))
def test_random_byte_streams_release_all_but_the_last_unfinished_character(
    tokenizer: ByteLevelTokenizer, seed: int
) -> None:
    rng = random.Random(seed)
    ids = _random_bytes_stream(tokenizer, rng)
    prompt = tokenizer.encode("Prompt: ")
    detok = IncrementalDetokenizer(tokenizer, prompt)
    for n, token_id in enumerate(ids, start=1):
        detok.add(token_id)
        whole = tokenizer.decode(ids[:n])  # the reference: the tokenizer's own decode of the output so far
        if not whole.endswith("\ufffd"):
            assert detok.text == whole
        elif tokenizer.byte_level:
            assert detok.text == whole[:-1]  # only the last U+FFFD may still become a character
        else:
            assert whole.startswith(detok.text)
    detok.flush()
    assert detok.text == tokenizer.decode(ids)


def _byte_fallback_tokenizer() -> HFTokenizer:
    """SentencePiece's byte fallback (Llama 2, Mistral 7B): one ``<0xNN>`` token a byte, and a run of them
    shows as one U+FFFD a byte until the run is valid UTF-8."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def test_only_a_byte_level_decoder_counts_as_byte_level(bpe: HFTokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    from server.runtime.tokenizer import HFTokenizer as EngineTokenizer

    fallback = _byte_fallback_tokenizer()
    # why it must not: an unfinished character's first U+FFFD is not final there
    e3, x81, x82 = (1 + b for b in (0xE3, 0x81, 0x82))
    assert fallback.decode([e3, x81]) == "\ufffd\ufffd" and fallback.decode([e3, x81, x82]) == "\u3042"
    engine_fallback = EngineTokenizer(PreTrainedTokenizerFast(tokenizer_object=fallback))
    assert EngineTokenizer(PreTrainedTokenizerFast(tokenizer_object=bpe)).byte_level
    assert not engine_fallback.byte_level
    ids = [1 + ord("A"), e3, x81, x82, 1 + ord("B")]
    pieces = _stream(IncrementalDetokenizer(engine_fallback, []), ids)
    assert pieces == ["A", "", "", "\u3042", "B", ""]


# (text, stop strings, released text, stopped)
STOP_CASES = [
    pytest.param("Hello world!", ["world"], "Hello ", True, id="middle"),
    pytest.param("Hello world!", ["Hello"], "", True, id="at-start"),
    pytest.param("Hello world!", ["!"], "Hello world", True, id="at-end"),
    pytest.param("Hello world!", ["xyz"], "Hello world!", False, id="absent"),
    pytest.param("Hello world!", ["lo wo"], "Hel", True, id="spans-tokens"),
    pytest.param("Hello world!", ["world", "o w", "!"], "Hell", True, id="earliest-wins"),
    pytest.param("Hello world!", ["ld!", "world"], "Hello ", True, id="earliest-wins-listed-later"),
    pytest.param("Hello world!", ["wor", "world"], "Hello ", True, id="same-start"),
    pytest.param("aaab", ["aab"], "a", True, id="overlapping-prefix"),
    pytest.param("Hello wor", ["world"], "Hello wor", False, id="prefix-at-end-flushed"),
    pytest.param("Emoji: 😀 🎉", ["🎉"], "Emoji: 😀 ", True, id="emoji-stop"),
    pytest.param("rare glyphs: 🚀✨🦀", ["✨"], "rare glyphs: 🚀", True, id="stop-in-split-chars"),
    pytest.param("日本語のテキスト", ["のテ"], "日本語", True, id="cjk"),
    pytest.param("### Answer: 42", ["\n", "Answer"], "### ", True, id="answer"),
    pytest.param("", ["x"], "", False, id="empty-output"),
    pytest.param("a", ["a"], "", True, id="single-token-stop"),
    pytest.param("a", ["b"], "a", False, id="single-token-no-stop"),
]


@pytest.mark.parametrize(("text", "stop", "released", "stopped"), STOP_CASES)
def test_stop_strings(
    tokenizer: ByteLevelTokenizer, text: str, stop: list[str], released: str, stopped: bool
) -> None:
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Q: "), stop)
    pieces = _stream(detok, tokenizer.encode(text))
    assert "".join(pieces) == detok.text == released
    assert detok.stopped is stopped
    assert all("\ufffd" not in p for p in pieces)


def test_holds_back_a_possible_stop_until_flush(tokenizer: ByteLevelTokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], stop=["world peace"])
    for token_id in tokenizer.encode("Hello world"):
        detok.add(token_id)
    assert detok.text == "Hello "
    assert detok.flush() == "world"
    assert detok.text == "Hello world"


def test_after_a_stop_nothing_more_is_released(tokenizer: ByteLevelTokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], stop=["fox"])
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    pieces = [detok.add(i) for i in ids]
    assert detok.stopped and detok.text == "The quick brown "
    assert "".join(pieces) == "The quick brown "
    assert detok.add(ids[0]) == "" and detok.flush() == ""


def test_flush_releases_an_incomplete_character(tokenizer: ByteLevelTokenizer) -> None:
    ids = tokenizer.encode("go 🚀")
    cut = next(n for n in range(len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tokenizer, [])
    for token_id in ids[:cut]:
        detok.add(token_id)
    held_back = detok.flush()
    assert held_back.endswith("\ufffd")
    assert detok.text == tokenizer.decode(ids[:cut])


class SentencePieceLikeTokenizer:
    """Word pieces with '▁' for a space; decoding drops the leading space, as SentencePiece does."""

    PIECES = ("Hello", "▁world", "▁again", "!")
    byte_level = False

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset()

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        raise NotImplementedError

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(self.PIECES[i] for i in token_ids).replace("▁", " ").removeprefix(" ")


def test_keeps_the_space_at_the_prompt_boundary() -> None:
    tokenizer = SentencePieceLikeTokenizer()
    detok = IncrementalDetokenizer(tokenizer, [0], stop=["again!"])
    assert [detok.add(i) for i in (1, 2, 3)] == [" world", " ", ""]
    assert detok.stopped and detok.text == " world "
    no_prompt = IncrementalDetokenizer(tokenizer, [])
    assert _stream(no_prompt, [1, 2, 3]) == ["world", " again", "!", ""]
