"""Grammar constraints without a model: the compile cache (once per grammar, bounded), bad grammars as
errors naming their field, the bitmask layout against llguidance's own, and the sampler honouring a mask
for greedy rows, sampled rows and logprobs while unconstrained rows are untouched."""

from __future__ import annotations

import json
import re
from typing import Any

import llguidance
import llguidance.torch
import pytest
import torch
from transformers import AutoTokenizer

from server.engine.types import InvalidRequestError, SamplingParams
from server.runtime.sampler import Sampler
from server.runtime.token_bitmask import allowed_tokens, bitmask_words, fill_token_bitmask
from server.structured.grammar import MAX_GRAMMAR_CHARS, GrammarCompiler, GrammarSpec, ascii_digits

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def hf_tokenizer(demo_bundle: Any) -> Any:
    return AutoTokenizer.from_pretrained(demo_bundle.base)


@pytest.fixture
def compiler(hf_tokenizer: Any) -> GrammarCompiler:
    return GrammarCompiler(
        hf_tokenizer, vocab_size=len(hf_tokenizer), eos_token_ids=[hf_tokenizer.eos_token_id], cache_size=2
    )


def run_text(compiler: GrammarCompiler, hf_tokenizer: Any, spec: GrammarSpec, text: str) -> bool:
    """Feed ``text``'s tokens to a fresh constraint: True if all are accepted and the grammar is complete."""
    constraint = compiler.compile(spec)
    return all(constraint.accept(t) for t in hf_tokenizer.encode(text, add_special_tokens=False)) and (
        constraint.is_complete or constraint.accept(hf_tokenizer.eos_token_id)
    )


def test_a_grammar_compiles_once_and_the_cache_is_bounded(compiler: GrammarCompiler) -> None:
    specs = [GrammarSpec("regex", f"a{{{n}}}", "structured_outputs.regex") for n in (1, 2, 3)]
    first = compiler.compile(specs[0])
    second = compiler.compile(specs[0])
    assert compiler.compiles == 1
    assert first.matcher is not second.matcher  # each request gets its own state
    compiler.compile(specs[1])
    compiler.compile(specs[2])  # evicts specs[0]
    assert len(compiler) == 2
    compiler.compile(specs[0])
    assert compiler.compiles == 4


@pytest.mark.parametrize(
    ("spec", "good", "bad"),
    [
        (GrammarSpec("regex", r"\d{2}-[ab]", "p"), "12-a", "12-c"),
        (GrammarSpec("choice", json.dumps(["yes", "no"]), "p"), "no", "nope"),
        (
            GrammarSpec.json_schema(
                {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, "p"
            ),
            '{"a":5}',
            '{"a":"5"}',
        ),
        (GrammarSpec("json_object", "", "p"), '{"k":[1,2]}', "[1,2]"),
        (GrammarSpec("grammar", 'start: "x" ("y")+', "p"), "xyy", "xz"),
    ],
)
def test_constraints_accept_their_language_only(
    compiler: GrammarCompiler, hf_tokenizer: Any, spec: GrammarSpec, good: str, bad: str
) -> None:
    assert run_text(compiler, hf_tokenizer, spec, good)
    assert not run_text(compiler, hf_tokenizer, spec, bad)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (r"[a-z]{3}-\d{2}", r"[a-z]{3}-[0-9]{2}"),
        (r"\D+\d", r"[^0-9]+[0-9]"),
        (r"[\d_]|[^\d]", r"[0-9_]|[^0-9]"),
        (r"[]\d]", r"[]0-9]"),  # "]" first in a class is a literal, the class goes on
        (r"\\d\[\d\]", r"\\d\[[0-9]\]"),  # an escaped backslash, escaped brackets
        (r"[\D]", r"[\D]"),  # no ASCII spelling inside a class: left as it is
    ],
)
def test_regex_digits_are_ascii(pattern: str, expected: str) -> None:
    assert ascii_digits(pattern) == expected
    assert re.compile(expected)


@pytest.mark.parametrize("digits", ["\U0001ccf4\U0001ccf3", "\u0663\u0664"])  # outlined; Arabic-Indic
def test_a_regex_digit_is_never_a_unicode_digit(
    compiler: GrammarCompiler, hf_tokenizer: Any, digits: str
) -> None:
    spec = GrammarSpec("regex", r"\d{2}-[ab]", "p")
    text = f"{digits}-a"
    assert hf_tokenizer.decode(hf_tokenizer.encode(text, add_special_tokens=False)) == text  # it can say it
    assert run_text(compiler, hf_tokenizer, spec, "42-a")
    assert not run_text(compiler, hf_tokenizer, spec, text)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (GrammarSpec("regex", "(", "structured_outputs.regex"), "regular expression"),
        (GrammarSpec("regex", "(?=a)b", "guided_regex"), ""),
        (GrammarSpec.json_schema({"type": "nope"}, "response_format.json_schema.schema"), ""),
        (GrammarSpec.json_schema({"type": "string", "format": "nope"}, "guided_json"), "format"),
        (GrammarSpec("grammar", "start: ???", "structured_outputs.grammar"), ""),
        (GrammarSpec("regex", "a" * (MAX_GRAMMAR_CHARS + 1), "guided_regex"), "larger"),
    ],
)
def test_bad_grammars_name_their_field(compiler: GrammarCompiler, spec: GrammarSpec, message: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile(spec)
    assert info.value.param == spec.param
    assert message in info.value.message
    assert compiler.compiles == 0


def test_json_schema_spec_refuses_non_objects() -> None:
    with pytest.raises(InvalidRequestError) as info:
        GrammarSpec.json_schema([1], "guided_json")
    assert info.value.param == "guided_json"


def test_bitmask_matches_llguidance_and_leaves_free_rows_open(
    compiler: GrammarCompiler, hf_tokenizer: Any
) -> None:
    vocab = len(hf_tokenizer) + 40  # a model may pad its vocabulary
    compiler = GrammarCompiler(hf_tokenizer, vocab_size=vocab, eos_token_ids=[hf_tokenizer.eos_token_id])
    constraint = compiler.compile(GrammarSpec("regex", "[0-9]+", "p"))
    ours = fill_token_bitmask(3, vocab, [(1, constraint)])  # [3, W]
    reference = llguidance.torch.allocate_token_bitmask(1, vocab)
    llguidance.torch.fill_next_token_bitmask(
        compiler.compile(GrammarSpec("regex", "[0-9]+", "p")).matcher, reference
    )
    assert ours.shape == (3, bitmask_words(vocab))
    assert torch.equal(ours[1], reference[0])
    allowed = allowed_tokens(ours, vocab)  # [3, V]
    assert allowed[0].all() and allowed[2].all()
    digits = {t for t in range(len(hf_tokenizer)) if re.fullmatch(r"[0-9]+", hf_tokenizer.decode([t]))}
    assert set(allowed[1].nonzero().flatten().tolist()) == digits


def test_sampler_respects_the_mask_greedy_sampled_and_logprobs() -> None:
    vocab = 70
    sampler = Sampler(vocab, 4, CPU, logprobs_mode="processed_logprobs")
    sampler.start(0, [1], SamplingParams(temperature=0.0), seed=1)
    sampler.start(1, [1], SamplingParams(temperature=1.0), seed=2)
    sampler.start(2, [1], SamplingParams(temperature=0.0), seed=3)
    logits = torch.zeros(3, vocab)
    logits[:, 5] = 10.0  # the favourite, which rows 0 and 1 forbid
    bitmask = torch.full((3, bitmask_words(vocab)), -1, dtype=torch.int32)
    bitmask[:2] = 0
    bitmask[:2, 1] = 1 << 3 | 1 << 4  # tokens 35 and 36 only
    for _ in range(20):
        out = sampler.sample(
            logits.clone(),
            torch.tensor([0, 1, 2]),
            logprob_rows=torch.tensor([0, 1]),
            num_logprobs=5,
            token_bitmask=bitmask,
        )
        tokens = out.token_ids.tolist()
        assert tokens[0] == 35  # greedy: the first allowed maximum
        assert tokens[1] in (35, 36)
        assert tokens[2] == 5  # unconstrained row untouched
        assert out.logprobs is not None
        for row in out.logprobs.to_host([5, 5]):
            assert set(row.top_ids[:2]) == {35, 36}
            assert all(lp <= -9999.0 for lp in row.top_logprobs[2:])  # -inf, reported JSON-safe


@pytest.mark.parametrize(
    "spec",
    [
        GrammarSpec("grammar", 'start: "<|system|>" "x"\n', "structured_outputs.grammar"),
        GrammarSpec("regex", r"<\|system\|>x", "structured_outputs.regex"),
    ],
)
def test_the_mask_never_offers_a_special_token_the_matcher_refuses(
    compiler: GrammarCompiler, hf_tokenizer: Any, spec: GrammarSpec
) -> None:
    # llguidance's own mask admits the special token whose text is the literal the grammar needs next, and
    # then refuses to consume it (a token sampled from it failed the request with a 500). Ours leaves it out.
    special = hf_tokenizer.convert_tokens_to_ids("<|system|>")
    assert special in hf_tokenizer.all_special_ids
    raw = llguidance.torch.allocate_token_bitmask(1, len(hf_tokenizer))
    llguidance.torch.fill_next_token_bitmask(compiler.compile(spec).matcher, raw)
    assert allowed_tokens(raw, len(hf_tokenizer))[0, special]  # the premise: remove this test once fixed
    constraint = compiler.compile(spec)
    assert not constraint.accept(special)
    ours = allowed_tokens(
        fill_token_bitmask(1, len(hf_tokenizer), [(0, compiler.compile(spec))]), len(hf_tokenizer)
    )
    assert not ours[0, special]


def test_a_special_token_the_grammar_names_stays_allowed(
    compiler: GrammarCompiler, hf_tokenizer: Any
) -> None:
    special = hf_tokenizer.convert_tokens_to_ids("<|system|>")
    spec = GrammarSpec("grammar", f'start: "a" <[{special}]> "b"\n', "structured_outputs.grammar")
    constraint = compiler.compile(spec)
    assert constraint.accept(hf_tokenizer.convert_tokens_to_ids("a"))
    allowed = allowed_tokens(fill_token_bitmask(1, len(hf_tokenizer), [(0, constraint)]), len(hf_tokenizer))
    assert allowed[0].nonzero().flatten().tolist() == [special]
    assert constraint.accept(special)
