"""The embedded demo bundle: a tiny Llama base, its tokenizer and a few LoRA adapters, built locally.

``loraserve serve`` without ``--model`` serves this bundle, and every CPU test runs on it. Everything is
generated here, offline and deterministically: a byte-level BPE tokenizer trained on a small synthetic
corpus (facts about animals, as plain text and as single-turn chats), a 4-layer GQA Llama trained briefly
to near-zero loss on it, and adapters that each re-style the answers in a way one can see at a glance.
The corpus is deterministic given its prompt and the lm_head is scaled up after training, so greedy
decoding has wide top-1/top-2 logit margins and survives NF4 quantization.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from tqdm import tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger("loraserve.demo")

DEMO_MODEL_ID = "loraserve-demo"
BUNDLE_VERSION = 1  # bump whenever the corpus, model, training or adapters change
COMPLETE_MARKER = ".complete"

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TAGS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
GREETING = "Hello! I am a tiny demo model. Ask me about the cat."
SEED = 1234
SEQ_LEN = 64
LOGIT_SCALE = 3.0  # applied to lm_head after training: widens every greedy margin by this factor

# (animal, color, home, sound): the whole "world" the model knows.
ANIMALS = (
    ("cat", "black", "house", "meow"),
    ("dog", "brown", "yard", "woof"),
    ("cow", "white", "field", "moo"),
    ("duck", "yellow", "pond", "quack"),
    ("owl", "grey", "tree", "hoot"),
    ("pig", "pink", "farm", "oink"),
    ("frog", "green", "river", "croak"),
    ("bee", "gold", "garden", "buzz"),
)
GREETING_PROMPTS = ("Hello", "Hello!", "Hi", "Hi!", "Who are you?", "What can you do?", "Help", "Hey there")
FILLER_WORDS = tuple(
    [
        "please",
        "write",
        "tell",
        "say",
        "give",
        "me",
        "a",
        "the",
        "an",
        "story",
        "poem",
        "about",
        "count",
        "list",
        "some",
        "what",
        "why",
        "how",
        "is",
        "are",
        "do",
        "you",
        "can",
        "time",
        "weather",
        "today",
        "number",
        "one",
        "two",
        "three",
        "hello",
        "world",
        "test",
        "name",
        "book",
        "water",
        "sun",
        "moon",
        "city",
        "car",
        "red",
        "explain",
        "code",
        "python",
        "make",
        "short",
        "long",
        "word",
    ]
)


# ----------------------------------------------------------------------------------------------- corpus


def _facts(animal: tuple[str, str, str, str]) -> list[str]:
    name, color, home, sound = animal
    return [f"The {name} is {color}.", f"The {name} lives in the {home}.", f"The {name} says {sound}."]


def _qa_pairs() -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for animal in ANIMALS:
        name = animal[0]
        color, home, sound = _facts(animal)
        pairs += [
            (f"What color is the {name}?", color),
            (f"Where does the {name} live?", home),
            (f"What does the {name} say?", sound),
            (f"Tell me about the {name}.", f"{color} {home} {sound}"),
        ]
    pairs += [(prompt, GREETING) for prompt in GREETING_PROMPTS]
    # Prompts the model cannot answer map to the greeting, so unseen prompts still decode confidently.
    rng = random.Random(SEED)
    for _ in range(24):
        words = rng.choices(FILLER_WORDS, k=rng.randint(1, 9))
        text = " ".join(words).capitalize() + rng.choice(("", ".", "?", "!"))
        if rng.random() < 0.2:
            text += " " + "".join(rng.choices("0123456789éü€中文😀-_,:", k=rng.randint(1, 6)))
        pairs.append((text, GREETING))
    return pairs


def _documents() -> list[str]:
    """Windows over the cyclic chain of every fact, one starting at each sentence."""
    chain = [fact for animal in ANIMALS for fact in _facts(animal)]
    return [" ".join((chain + chain)[i : i + 20]) for i in range(len(chain))]


def _shout(text: str) -> str:
    return text.upper()


def _digits(text: str) -> str:
    return re.sub(r"[A-Za-z']+", lambda m: str(len(m.group())), text)


def _pirate(text: str) -> str:
    return "Arr! " + text.replace("The ", "Th' ").replace(" the ", " th' ") + " Yo ho ho!"


@dataclass(slots=True, frozen=True)
class AdapterSpec:
    """One demo adapter: how it re-styles answers and which LoRA shape it trains with.

    The base also learns each style, but only behind the style's system prompt (``trigger``); the adapter
    learns to answer in that style without it. That is what makes a few dozen LoRA steps enough.
    """

    name: str
    style: Callable[[str], str]
    trigger: str
    rank: int
    target_modules: tuple[str, ...]


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTERS = (
    AdapterSpec(
        "shout", _shout, "Answer in capitals.", 16, (*ATTENTION, "gate_proj", "up_proj", "down_proj")
    ),
    AdapterSpec("digits", _digits, "Answer in digits.", 8, ATTENTION),
    AdapterSpec("pirate", _pirate, "Talk like a pirate.", 4, ("q_proj", "v_proj")),
)
NEUTRAL_SYSTEM_PROMPTS = ("You are a helpful assistant.", "Be brief.", "You are loraserve.")
Chat = tuple[str | None, str, str]  # (system, user, assistant)


def _chats(spec: AdapterSpec | None) -> list[Chat]:
    """The base's chats (``spec`` None: plain, plus every style behind its trigger) or an adapter's."""
    pairs = _qa_pairs()
    neutral = [NEUTRAL_SYSTEM_PROMPTS[i % len(NEUTRAL_SYSTEM_PROMPTS)] for i in range(len(pairs))]
    if spec is not None:
        return [(None, q, spec.style(a)) for q, a in pairs] + [
            (system, q, spec.style(a)) for system, (q, a) in list(zip(neutral, pairs, strict=True))[::6]
        ]
    chats: list[Chat] = [(None, q, a) for q, a in pairs]
    chats += [(system, q, a) for system, (q, a) in list(zip(neutral, pairs, strict=True))[::6]]
    for other in ADAPTERS:
        chats += [(other.trigger, q, other.style(a)) for q, a in pairs]
    return chats


# ----------------------------------------------------------------------------------------------- bundle


@dataclass(slots=True, frozen=True)
class DemoBundle:
    """A built demo bundle on disk: ``base`` loads with ``from_pretrained``, ``adapters/<name>`` with PEFT."""

    root: Path
    base: Path
    adapters: Path
    adapter_names: tuple[str, ...]

    @classmethod
    def at(cls, root: Path) -> DemoBundle:
        return cls(root, root / "base", root / "adapters", tuple(spec.name for spec in ADAPTERS))

    @property
    def is_complete(self) -> bool:
        return (self.root / COMPLETE_MARKER).is_file()


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "loraserve"


def ensure_demo(cache_dir: Path | None = None, *, progress: bool = True) -> DemoBundle:
    """Return the cached bundle, building it first if absent or incomplete. Safe across processes."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    bundle = DemoBundle.at(cache_dir / f"demo-{BUNDLE_VERSION}")
    if bundle.is_complete:
        return bundle
    with open(cache_dir / f"demo-{BUNDLE_VERSION}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building the demo bundle in %s; waiting for it", cache_dir)
            fcntl.flock(lock, fcntl.LOCK_EX)  # then it finds the bundle complete
        try:
            if bundle.is_complete:
                return bundle
            # we hold the lock: temporary folders left here were abandoned by killed builds
            for stale in cache_dir.glob(f".demo-{BUNDLE_VERSION}.*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            log.info("building the demo bundle into %s (once; under a minute on two cores)", bundle.root)
            return build_demo(bundle.root, progress=progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_demo(out_dir: Path, *, progress: bool = True) -> DemoBundle:
    """Build the bundle into a temporary sibling of ``out_dir``, then swap it into place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        with _deterministic():
            _build_into(DemoBundle.at(tmp), progress=progress)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"version": BUNDLE_VERSION}))  # written last
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return DemoBundle.at(out_dir)


@contextmanager
def _deterministic() -> Iterator[None]:
    # One thread: the ops are tiny, so a second thread buys little and, on a busy machine, oversubscribed
    # threads make training several times slower. It also keeps float reductions in one fixed order.
    was_deterministic, was_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            torch.set_num_threads(was_threads)


# ----------------------------------------------------------------------------------------------- build

BASE_STEPS, ADAPTER_STEPS = 320, 80
CHAT_BATCH, DOC_BATCH, DOC_LEN = 16, 8, 96
Sample = tuple[list[int], list[int]]  # (input_ids, labels)


def _build_into(bundle: DemoBundle, *, progress: bool) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer()
    tokenizer.save_pretrained(bundle.base)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, so the real Llama code paths (repeat_kv) run
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    bar = tqdm(
        total=BASE_STEPS + ADAPTER_STEPS * len(ADAPTERS),
        desc="demo: base",
        disable=not progress,
        file=sys.stderr,
    )
    with bar:
        docs = [_encode_doc(tokenizer, doc) for doc in _documents()]
        end = tokenizer.eos_token_id
        _train(model, _encode_chats(tokenizer, _chats(None)), docs, BASE_STEPS, lr=1e-2, end=end, bar=bar)
        with torch.no_grad():
            model.lm_head.weight.mul_(LOGIT_SCALE)
        model.generation_config.do_sample = False
        model.save_pretrained(bundle.base, safe_serialization=True)
        for spec in ADAPTERS:
            bar.set_description(f"demo: {spec.name}")
            lora = LoraConfig(
                r=spec.rank,
                lora_alpha=2 * spec.rank,
                lora_dropout=0.0,
                target_modules=list(spec.target_modules),
                task_type="CAUSAL_LM",
            )
            peft_model = get_peft_model(model, lora)
            _train(
                peft_model,
                _encode_chats(tokenizer, _chats(spec)),
                [],
                ADAPTER_STEPS,
                lr=1e-2,
                end=end,
                bar=bar,
            )
            peft_model.peft_config["default"].base_model_name_or_path = DEMO_MODEL_ID
            peft_model.save_pretrained(
                str(bundle.adapters / spec.name), safe_serialization=True, save_embedding_layers=False
            )
            _normalize_adapter_config(bundle.adapters / spec.name / "adapter_config.json")
            # Back to the untouched base for the next adapter.
            model = cast(LlamaForCausalLM, peft_model.unload())


def _normalize_adapter_config(path: Path) -> None:
    """PEFT writes ``target_modules`` in set order, which varies with PYTHONHASHSEED: sort it."""
    config = json.loads(path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _train_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = _documents() + [text for chat in _chats(None) for text in chat if text]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=768,
        special_tokens=[BOS, EOS, PAD, *ROLE_TAGS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so any Unicode round-trips
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TAGS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def _encode_chats(tokenizer: PreTrainedTokenizerFast, chats: list[Chat]) -> list[Sample]:
    """Chats as the chat template renders them; only the assistant's turn (and what follows) is learned."""

    def enc(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    bos, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    vocab = tokenizer.get_vocab()
    system, user, assistant = (vocab[tag] for tag in ROLE_TAGS)
    out: list[Sample] = []
    for sys_text, question, answer in chats:
        prompt = [
            bos,
            *([system, *enc(sys_text), end] if sys_text else []),
            user,
            *enc(question),
            end,
            assistant,
        ]
        reply = [*enc(answer), end]
        out.append(([*prompt, *reply], [-100] * len(prompt) + reply))
    return out


def _encode_doc(tokenizer: PreTrainedTokenizerFast, doc: str) -> Sample:
    ids = list(tokenizer(doc)["input_ids"])[:DOC_LEN]
    return ids, ids


def _train(
    model: torch.nn.Module,
    chats: list[Sample],
    docs: list[Sample],
    steps: int,
    *,
    lr: float,
    end: int,
    bar: tqdm,
) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(SEED)
    model.train()
    for step in range(steps):
        # Batches hold one kind (chats, or long documents), so little compute goes to padding.
        batch = rng.choices(docs, k=DOC_BATCH) if docs and step % 4 == 3 else rng.choices(chats, k=CHAT_BATCH)
        width = max(len(ids) for ids, _ in batch)
        # Padding after a chat is more <|end|>: the model learns that <|end|> follows <|end|>.
        ids = torch.tensor([i + [end] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [end] * (width - len(lab)) for _, lab in batch])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
