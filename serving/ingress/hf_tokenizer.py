"""A model's own tokenizer and chat template, for real engines.

The gateway's word tokenizer and fixed `<|role|> text` template suit simulated
engines. A real instruct model must see its own chat template, and the prompt
must be tokenized as vLLM's server would: with a model's `tokenizer` set in the
config, chat messages are rendered with its template (`add_generation_prompt`)
and tokenized without adding special tokens again (the template has them), a
completion's text is tokenized as vLLM's completions endpoint does (special
tokens added), and the engine gets the token ids. The router then hashes the
same ids the engine caches.

Needs `transformers` (installed with vLLM).
"""

from __future__ import annotations

from typing import Any

from serving.engines.vllm_engine import repo_path  # light: vLLM itself is imported lazily
from serving.errors import InvalidRequest


class HFTokenizer:
    def __init__(self, name_or_path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise RuntimeError(f"models[].tokenizer {name_or_path!r} needs transformers "
                               "(pip install '.[cpu]' or vllm)") from e
        self.tok: Any = AutoTokenizer.from_pretrained(repo_path(name_or_path))
        if not getattr(self.tok, "chat_template", None):
            raise RuntimeError(f"tokenizer {name_or_path!r} has no chat template")

    def chat(self, messages: tuple[dict[str, Any], ...], tools: tuple[dict[str, Any], ...] = ()) -> list[int]:
        try:
            text = self.tok.apply_chat_template(list(messages), tools=list(tools) or None,
                                                add_generation_prompt=True, tokenize=False)
        except Exception as e:  # the template refuses the conversation (roles out of order, ...)
            raise InvalidRequest(f"The chat template rejected the messages: {e}", param="messages") from None
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text).input_ids)
