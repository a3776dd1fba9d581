"""The engine's ``Tokenizer`` protocol over a Hugging Face tokenizer."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import Any

from tokenizers import decoders
from transformers import GenerationConfig, PreTrainedTokenizerBase

from server.engine.types import ChatMessage, InvalidRequestError


class HFTokenizer:
    """Wraps a Hugging Face tokenizer. Completions add the tokenizer's own special tokens (BOS); chat
    prompts come from the tokenizer's chat template with the generation prompt appended."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None = None
    ) -> None:
        self.hf = tokenizer
        eos: set[int] = set()
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        if generation_config is not None and generation_config.eos_token_id is not None:
            ids = generation_config.eos_token_id
            eos.update(int(i) for i in (ids if isinstance(ids, list) else [ids]))
        self._eos = frozenset(eos)
        # what ``skip_special_tokens`` drops: the named special tokens and every added token marked special
        # (a Mistral tokenizer's ``[TOOL_CALLS]`` is one, without being in ``all_special_ids``)
        added = getattr(tokenizer, "added_tokens_decoder", {})
        self._special_ids = frozenset(int(i) for i in tokenizer.all_special_ids) | frozenset(
            int(i) for i, token in added.items() if getattr(token, "special", False)
        )
        self._token_text: dict[int, str] = {}  # bounded by the vocabulary
        self._byte_level = tokenizer.is_fast and isinstance(
            tokenizer.backend_tokenizer.decoder, decoders.ByteLevel
        )

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def byte_level(self) -> bool:
        """A fast tokenizer whose decoder is byte-level BPE's alone (see the protocol)."""
        return self._byte_level

    @property
    def num_ids(self) -> int:
        """How many ids the tokenizer can decode (a model may pad its embedding past them)."""
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def encode_chat(
        self, messages: Sequence[ChatMessage], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """The chat template's rendering of ``messages`` (with ``tools`` as its ``tools`` argument)."""
        if not self.has_chat_template:
            raise InvalidRequestError("this model's tokenizer has no chat template", param="messages")
        conversation = [_template_message(m) for m in messages]
        try:
            text = self.hf.apply_chat_template(
                conversation, tools=list(tools or []) or None, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # the template itself raised (e.g. "roles must alternate")
            raise InvalidRequestError(
                f"the chat template refused these messages: {exc}", param="messages"
            ) from exc
        return list(self.hf.encode(str(text), add_special_tokens=False))

    def decode(
        self,
        token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        keep_special_token_ids: Collection[int] = (),
    ) -> str:
        """Text of ``token_ids``. With special tokens kept, ``spaces_between_special_tokens`` puts a space
        between each special token and its neighbours, as vLLM (and slow HF tokenizers) do; fast HF
        tokenizers ignore that option, so it is applied here. ``keep_special_token_ids`` are special
        tokens shown even when the others are skipped (a tool parser's markers), as their own text."""
        ids = list(token_ids)
        if skip_special_tokens and keep_special_token_ids:
            kept = [t for t in ids if t not in self._special_ids or t in keep_special_token_ids]
            return str(self.hf.decode(kept, skip_special_tokens=False))
        if skip_special_tokens or not spaces_between_special_tokens:
            return str(self.hf.decode(ids, skip_special_tokens=skip_special_tokens))
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in self._special_ids:
                if run:
                    parts.append(str(self.hf.decode(run)))
                    run = []
                parts.append(str(self.hf.convert_ids_to_tokens(token_id)))
            else:
                run.append(token_id)
        if run:
            parts.append(str(self.hf.decode(run)))
        return " ".join(parts)

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = str(self.hf.decode([token_id], skip_special_tokens=False))
        return text

    def special_token_id(self, text: str) -> int | None:
        """The id of the special token spelt ``text``, None when ``text`` is not one special token."""
        token_id = self.hf.convert_tokens_to_ids(text)
        return token_id if isinstance(token_id, int) and token_id in self._special_ids else None

    def encode_plain(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """``encode`` with the choice of special tokens (``/tokenize``'s ``add_special_tokens``)."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))


def _template_message(message: ChatMessage) -> dict[str, Any]:
    # The shape Hugging Face chat templates expect: tool calls with their arguments as an object (templates
    # apply ``tojson`` themselves), a tool message with the id of the call it answers.
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": json.loads(call.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out
