"""The engine's ``Tokenizer`` protocol over a Hugging Face tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

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

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def num_ids(self) -> int:
        """How many ids the tokenizer can decode (a model may pad its embedding past them)."""
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        if not self.has_chat_template:
            raise InvalidRequestError("this model's tokenizer has no chat template", param="messages")
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            text = self.hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template itself raised (e.g. "roles must alternate")
            raise InvalidRequestError(
                f"the chat template refused these messages: {exc}", param="messages"
            ) from exc
        return list(self.hf.encode(str(text), add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.hf.decode(list(token_ids), skip_special_tokens=True))
