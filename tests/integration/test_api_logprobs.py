"""Logprobs, echo, prompt lists, n and vLLM's sampling extras on the real server (demo bundle, CPU).

Logprob values are checked against an independent reference: ``log_softmax`` of a plain PEFT forward on a
freshly loaded copy of the same base and adapters (wrapped before any forward), for the base and each
adapter, alone and batched with other prompts and adapters. Every raw body and chunk is validated against
the OpenAI contract; the official client parses the same answers.

The server and the reference run the demo base unquantized (``--quantization none``): that isolates what
this module tests (which logits, which positions, which rows) from the NF4 + LoRA discrepancy on CPUs with
AVX512-BF16 (issue 11), which makes adapter rows differ from the reference by up to ~3 nats there.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch
from peft import PeftModel

from tests.integration.api_server import ServerProcess, assert_error, read_stream, start_server, validate

pytestmark = pytest.mark.slow

BASE = "demo-base"
MAX_MODEL_LEN = 256
# Engine (batched, left-padded, slot KV cache) vs a plain forward, float32 on the CPU: the same arithmetic
# up to summation order. Measured differences are below 1e-5.
ATOL = 1e-4
PROMPTS = ["The cat is", "The dog says", "The owl lives in the barn. The cow lives in the field. The pig"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_bundle: Any) -> Iterator[ServerProcess]:
    process = start_server(
        tmp_path_factory.mktemp("logprobs"),
        [
            "--model",
            str(demo_bundle.base),
            "--adapter-dir",
            str(demo_bundle.adapters),
            "--served-model-name",
            BASE,
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--quantization",
            "none",
        ],
    )
    yield process
    assert process.terminate() == 0, process.log_tail()


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.http() as client:
        yield client


@pytest.fixture(scope="module")
def reference(demo_bundle: Any) -> Any:
    """A fresh copy of the base with every demo adapter, wrapped by PEFT before any forward."""
    from server.runtime.loader import ModelSpec, load_model

    base = load_model(ModelSpec(source=str(demo_bundle.base), quantization="none"))
    names = list(demo_bundle.adapter_names)
    model = PeftModel.from_pretrained(base, str(demo_bundle.adapters / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(demo_bundle.adapters / name), adapter_name=name)
    model.eval()
    return model


def reference_logprobs(reference: Any, ids: list[int], adapter: str | None) -> torch.Tensor:
    """``[len(ids), V]``: row ``i`` is the log-distribution of the token after ``ids[: i + 1]``."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        if adapter is None:
            with reference.disable_adapter():
                logits = reference(input_ids=x).logits[0]
        else:
            reference.set_adapter(adapter)
            logits = reference(input_ids=x).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def token_id(name: str) -> int:
    assert name.startswith("token_id:"), name
    return int(name.removeprefix("token_id:"))


def tokenize(http: httpx.Client, text: str) -> list[int]:
    ids: list[int] = http.post("/tokenize", json={"model": BASE, "prompt": text}).json()["tokens"]
    return ids


def completion(http: httpx.Client, **body: Any) -> dict[str, Any]:
    response = http.post("/v1/completions", json={"model": BASE, **body})
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    validate("CreateCompletionResponse", data, echo=bool(body.get("echo")))
    return data


def check_against_reference(
    reference: Any, choice: dict[str, Any], adapter: str | None, num_prompt: int, k: int
) -> None:
    """An echoed choice (prompt + output, tokens named by id) against the reference forward."""
    logprobs = choice["logprobs"]
    ids = [token_id(t) for t in logprobs["tokens"]]
    want = reference_logprobs(reference, ids, adapter)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for pos in range(1, len(ids)):
        row = want[pos - 1]
        assert logprobs["token_logprobs"][pos] == pytest.approx(float(row[ids[pos]]), abs=ATOL), pos
        top = {token_id(t): v for t, v in logprobs["top_logprobs"][pos].items()}
        for t, value in top.items():
            assert value == pytest.approx(float(row[t]), abs=ATOL)
        assert set(row.topk(k).indices.tolist()) <= set(top)  # the top k, plus the token itself
        if pos >= num_prompt:  # greedy output: the reference's argmax
            assert ids[pos] == int(row.argmax())


@pytest.mark.parametrize("adapter", [None, "shout", "digits", "pirate"])
def test_logprobs_equal_the_reference_alone(http: httpx.Client, reference: Any, adapter: str | None) -> None:
    prompt = tokenize(http, PROMPTS[0])
    body = completion(
        http,
        model=adapter or BASE,
        prompt=prompt,
        max_tokens=5,
        temperature=0,
        logprobs=4,
        echo=True,
        return_tokens_as_token_ids=True,
        ignore_eos=True,
    )
    (choice,) = body["choices"]
    assert len(choice["logprobs"]["tokens"]) == len(prompt) + 5
    check_against_reference(reference, choice, adapter, len(prompt), 4)


def test_logprobs_equal_the_reference_batched(http: httpx.Client, reference: Any) -> None:
    """A prompt list per adapter, all adapters at once: they share prefill and decode steps."""
    prompts = [tokenize(http, p) for p in PROMPTS]

    def run(adapter: str | None) -> dict[str, Any]:
        return completion(
            http,
            model=adapter or BASE,
            prompt=prompts,
            max_tokens=4,
            temperature=0,
            logprobs=3,
            echo=True,
            return_tokens_as_token_ids=True,
            ignore_eos=True,
        )

    adapters = [None, "shout", "digits", "pirate"]
    with ThreadPoolExecutor(len(adapters)) as pool:
        bodies = list(pool.map(run, adapters))
    for adapter, body in zip(adapters, bodies, strict=True):
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        assert body["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
        assert body["usage"]["completion_tokens"] == 12
        for prompt, choice in zip(prompts, body["choices"], strict=True):
            check_against_reference(reference, choice, adapter, len(prompt), 3)


def test_chat_logprobs_equal_the_reference(http: httpx.Client, reference: Any) -> None:
    messages = [{"role": "user", "content": "What does the cat eat?"}]
    prompt = http.post("/tokenize", json={"model": "pirate", "messages": messages}).json()["tokens"]
    request = {
        "model": "pirate",
        "messages": messages,
        "max_tokens": 4,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
        "return_tokens_as_token_ids": True,
        "ignore_eos": True,
    }
    body = http.post("/v1/chat/completions", json=request).json()
    validate("CreateChatCompletionResponse", body)
    content = body["choices"][0]["logprobs"]["content"]
    ids = prompt + [token_id(e["token"]) for e in content]
    want = reference_logprobs(reference, ids, "pirate")
    for i, entry in enumerate(content):
        row = want[len(prompt) + i - 1]
        assert entry["logprob"] == pytest.approx(float(row[ids[len(prompt) + i]]), abs=ATOL)
        assert [token_id(t["token"]) for t in entry["top_logprobs"]] == row.topk(3).indices.tolist()
        assert entry["bytes"] and all(0 <= b < 256 for b in entry["bytes"])


def test_openai_client_echo_prompt_list_max_tokens_zero(server: ServerProcess, http: httpx.Client) -> None:
    client = server.openai()
    got = client.completions.create(model=BASE, prompt=PROMPTS[:2], logprobs=3, echo=True, max_tokens=0)
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == PROMPTS[:2]
    lengths = [len(tokenize(http, p)) for p in PROMPTS[:2]]
    for choice, n in zip(got.choices, lengths, strict=True):
        assert choice.logprobs is not None and choice.finish_reason == "length"
        assert len(choice.logprobs.tokens or []) == n
        assert (choice.logprobs.token_logprobs or [])[0] is None
        assert all(v is not None and v <= 0 for v in (choice.logprobs.token_logprobs or [])[1:])
        offsets = choice.logprobs.text_offset or []
        assert offsets == sorted(offsets) and offsets[0] == 0
    assert got.usage is not None
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (sum(lengths), 0)
    # the raw body of the same request validates (with echo's null first logprob)
    completion(http, prompt=PROMPTS[:2], logprobs=3, echo=True, max_tokens=0)


def test_openai_client_chat_logprobs_and_n(server: ServerProcess) -> None:
    client = server.openai()
    got = client.chat.completions.create(
        model="shout",
        messages=[{"role": "user", "content": "hi"}],
        logprobs=True,
        top_logprobs=2,
        max_tokens=3,
        n=2,
        seed=1,
    )
    assert [c.index for c in got.choices] == [0, 1]
    for choice in got.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        assert all(len(e.top_logprobs) == 2 and e.bytes is not None for e in choice.logprobs.content)
    stream = client.completions.create(model=BASE, prompt="The cat", logprobs=1, max_tokens=3, stream=True)
    tokens = [t for chunk in stream for c in chunk.choices if c.logprobs for t in (c.logprobs.tokens or [])]
    assert len(tokens) == 3


@pytest.mark.parametrize("echo", [False, True])
def test_completion_stream_carries_the_same_logprobs(http: httpx.Client, echo: bool) -> None:
    request = {"model": "digits", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "logprobs": 2}
    request |= {"echo": echo, "ignore_eos": True}
    plain = completion(http, **request)["choices"][0]
    with http.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
        chunks, done = read_stream(response)
    assert done
    merged: dict[str, list[Any]] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for chunk in chunks:
        validate("CreateCompletionResponse", chunk, streamed_completion=True, echo=echo)
        for key in merged:
            merged[key] += chunk["choices"][0]["logprobs"][key]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["text"]
    assert merged["tokens"] == plain["logprobs"]["tokens"]
    assert merged["text_offset"] == plain["logprobs"]["text_offset"]
    assert merged["token_logprobs"] == pytest.approx(plain["logprobs"]["token_logprobs"])


def test_chat_stream_with_n_carries_each_choices_logprobs(http: httpx.Client) -> None:
    request = {
        "model": BASE,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "logprobs": True,
        "top_logprobs": 1,
        "n": 3,
        "seed": 9,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/v1/chat/completions", json=request) as response:
        chunks, done = read_stream(response)
    assert done
    per_choice: dict[int, int] = {}
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
        for c in chunk["choices"]:
            per_choice[c["index"]] = per_choice.get(c["index"], 0) + len(
                (c["logprobs"] or {}).get("content") or []
            )
    usage = chunks[-1]["usage"]
    assert sorted(per_choice) == [0, 1, 2]
    assert sum(per_choice.values()) == usage["completion_tokens"]
    # prompt tokens count once per prompt, not once per choice
    plain = {k: v for k, v in request.items() if k not in ("stream", "stream_options")} | {"n": 1}
    assert (
        http.post("/v1/chat/completions", json=plain).json()["usage"]["prompt_tokens"]
        == usage["prompt_tokens"]
    )


def test_n_choices_are_reproducible_and_seeded_per_choice(http: httpx.Client) -> None:
    request = {"prompt": [0], "max_tokens": 8, "temperature": 2.0, "seed": 1234, "n": 4}
    first = [c["text"] for c in completion(http, **request)["choices"]]
    again = [c["text"] for c in completion(http, **request)["choices"]]
    assert first == again
    assert len(set(first)) > 1  # each choice has its own seed
    alone = completion(http, **(request | {"n": 1}))["choices"][0]["text"]
    assert alone == first[0]  # choice 0 samples with the request's own seed


def test_prompt_logprobs_extra_field(http: httpx.Client, reference: Any) -> None:
    prompt = tokenize(http, PROMPTS[0])
    body = completion(http, model="shout", prompt=prompt, max_tokens=1, prompt_logprobs=2)
    entries = body["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(prompt) and entries[0] is None
    want = reference_logprobs(reference, prompt, "shout")
    for pos in range(1, len(prompt)):
        entry = entries[pos]
        assert str(prompt[pos]) in entry  # the prompt's own token is always there
        for t, e in entry.items():
            assert e["logprob"] == pytest.approx(float(want[pos - 1, int(t)]), abs=ATOL)
            assert e["rank"] >= 1 and isinstance(e["decoded_token"], str)


# ------------------------------------------------------------------------------------- vLLM's extras


def greedy_first_token(http: httpx.Client, prompt: list[int]) -> int:
    body = completion(
        http, prompt=prompt, max_tokens=1, temperature=0, logprobs=0, return_tokens_as_token_ids=True
    )
    return token_id(body["choices"][0]["logprobs"]["tokens"][0])


def test_logit_bias_forces_a_token(http: httpx.Client) -> None:
    forced = tokenize(http, " owl")[-1]
    body = completion(
        http,
        prompt=PROMPTS[0],
        max_tokens=3,
        temperature=0,
        logit_bias={str(forced): 100},
        logprobs=0,
        return_tokens_as_token_ids=True,
        ignore_eos=True,
    )
    assert body["choices"][0]["logprobs"]["tokens"] == [f"token_id:{forced}"] * 3


def test_stop_token_ids_min_tokens_and_include_stop_str(http: httpx.Client) -> None:
    prompt = tokenize(http, PROMPTS[1])
    first = greedy_first_token(http, prompt)
    request = {"prompt": prompt, "max_tokens": 5, "temperature": 0, "stop_token_ids": [first]}
    stopped = completion(http, **request)["choices"][0]
    assert (stopped["text"], stopped["finish_reason"]) == ("", "stop")  # its text is left out, as vLLM
    kept = completion(http, **request, include_stop_str_in_output=True)["choices"][0]
    text = http.post("/detokenize", json={"model": BASE, "tokens": [first]}).json()["prompt"]
    assert (kept["text"], kept["finish_reason"]) == (text, "stop")
    late = completion(http, **request, min_tokens=2, logprobs=0, return_tokens_as_token_ids=True)
    tokens = late["choices"][0]["logprobs"]["tokens"]
    assert token_id(tokens[0]) != first and len(tokens) >= 2


def test_special_tokens_skipped_or_shown(http: httpx.Client) -> None:
    request = {"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    request["logit_bias"] = {"1": 100}  # <|end|>, the demo's EOS
    assert completion(http, **request)["choices"][0]["text"] == ""
    shown = completion(http, **request, skip_special_tokens=False)["choices"][0]["text"]
    # spaces between special tokens and their neighbours (the prompt's last word too), vLLM's default
    assert shown == " <|end|> <|end|>"
    joined = completion(http, **request, skip_special_tokens=False, spaces_between_special_tokens=False)
    assert joined["choices"][0]["text"] == "<|end|><|end|>"
    ended = completion(http, **(request | {"ignore_eos": False}))["choices"][0]
    assert (ended["text"], ended["finish_reason"]) == ("", "stop")


def test_max_tokens_omitted_uses_the_rest_of_the_context(http: httpx.Client) -> None:
    long_prompt = [7] * (MAX_MODEL_LEN - 3)
    body = completion(http, prompt=long_prompt, temperature=0, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"
    chat = http.post(
        "/v1/chat/completions",
        json={"model": BASE, "messages": [{"role": "user", "content": "x " * 100}], "ignore_eos": True},
    )
    assert chat.status_code == 200, chat.text
    usage = chat.json()["usage"]
    assert usage["total_tokens"] == MAX_MODEL_LEN  # generated up to the context


# ------------------------------------------------------------------------------------------ bad input

BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"prompt": "x", "logit_bias": {"716": 1}}, "logit_bias"),  # the demo's vocabulary has 716 tokens
    ({"prompt": "x", "stop_token_ids": [716]}, "stop_token_ids"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": ["x"] * 33}, "prompt"),
    ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "guided_json": 5}, "guided_json"),
    ({"prompt": "x", "bogus": 1}, "bogus"),
    ({"prompt": [[1, 2], [3, 716]]}, "prompt"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_BODIES)
def test_bad_values_are_400_naming_the_field(http: httpx.Client, fields: dict[str, Any], param: str) -> None:
    assert_error(http.post("/v1/completions", json={"model": BASE, **fields}), 400, param)


def test_chat_top_logprobs_without_logprobs(http: httpx.Client) -> None:
    body = {"model": BASE, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
    assert_error(http.post("/v1/chat/completions", json=body), 400, "top_logprobs")


def test_ignorable_fields_are_accepted(http: httpx.Client) -> None:
    completion(http, prompt="x", max_tokens=1, user="u", metadata={"k": "v"}, store=False)


def test_tokenize_bad_input(http: httpx.Client) -> None:
    assert_error(http.post("/tokenize", json={"model": BASE}), 400, "prompt")
    assert_error(http.post("/detokenize", json={"model": BASE, "tokens": [716]}), 400, "tokens")
    assert_error(http.post("/detokenize", json={"model": BASE, "tokens": "1"}), 400, "tokens")
    assert_error(http.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404, "model")
