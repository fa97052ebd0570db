"""A model's own tokenizer and chat template, for real engines.

The gateway's word tokenizer and fixed `<|role|> text` template suit simulated
engines. A real instruct model must see its own chat template, and the prompt
must be tokenized as vLLM's server would: with a model's `tokenizer` set in the
config, chat messages are rendered with its template (`add_generation_prompt`)
and tokenized without adding special tokens again (the template has them), a
completion's text is tokenized as vLLM's completions endpoint does (special
tokens added), and the engine gets the token ids. The router then hashes the
same ids the engine caches.

The messages reach the template as vLLM's server (0.32) passes them: content as
a string (text parts joined by newlines), or, for a template that loops over a
message's content (vLLM's "openai" content format, told from the template's
syntax tree as vLLM does), as a list of `{"type": "text"}` parts; a tool's
answer always as a string; a `developer` message as `system` unless the
template knows the role. So the prompt is the one vLLM's own server would
render, token for token (tested against vLLM's /tokenize).

Agent loops send the same long context again and again, one tool result longer
each time, and tokenizing it is the gateway's largest cost on the way to the
first token (about 40 ms for 30,000 tokens here). A Hugging Face tokenizer
first cuts the text at its added tokens (the template's role markers and the
like) and tokenizes each piece between them on its own. Where that holds
exactly (byte-level pre-tokenizers, as Llama 3, Qwen and GPT-style tokenizers
have; checked from the tokenizer's own description at start), the pieces'
token ids are kept in a cache bounded in tokens, and a request tokenizes only
the pieces it has not seen: its new messages. The result is identical to
tokenizing the whole text (tested on random conversations). Entries are keyed
by the request's cache salt too, as the engines' prefix caches are, so one
tenant cannot learn from a faster answer that another sent the same text
(serving.admission.tenancy). Other tokenizers
(SentencePiece-style `Metaspace`, added tokens that strip spaces) tokenize the
whole text every time.

Tokenizing is CPU work that releases the GIL: the gateway runs `bind` on a
thread of its own (Gateway.start), so a long prompt does not stall the other
streams on the event loop.
Needs `transformers` (installed with vLLM).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import Any

from serving.engines.vllm_engine import repo_path  # light: vLLM itself is imported lazily
from serving.errors import InvalidRequest

# pre-tokenizers that split a piece without looking at where the piece sits in the text
_LOCAL_PRE = {"Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit"}
_LOCAL_NORM = {None, "NFC", "NFKC", "NFD", "NFKD", "Lowercase"}
_MIN_CACHED = 64  # characters: shorter pieces are cheap to tokenize and would churn the cache


def _piecewise(backend: Any) -> re.Pattern | None:
    """A pattern that cuts text at the added tokens, if tokenizing piece by piece is exact."""
    desc = json.loads(backend.to_str())
    norm = desc.get("normalizer")
    if (norm or {}).get("type") not in _LOCAL_NORM:
        return None
    pre = desc.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    for s in steps:
        if not (s.get("type") in _LOCAL_PRE or (s.get("type") == "ByteLevel" and not s.get("add_prefix_space"))):
            return None
    added = desc.get("added_tokens") or []
    if not added or any(a["lstrip"] or a["rstrip"] or a["single_word"] or a["normalized"] for a in added):
        return None
    # longest first: at one position the longest added token wins, as the tokenizer matches them
    return re.compile("|".join(re.escape(a["content"]) for a in sorted(added, key=lambda a: -len(a["content"]))))


def _loops_over_content(template: str) -> bool:
    """Whether the template iterates over a message's content (`{% for part in
    message['content'] %}`, or over a variable named `content`): vLLM then passes content as
    a list of parts. vLLM's detection in a simpler form, on the template's syntax tree, following
    `messages` through `{% set %}` and the loop over it (vLLM also follows content into macro
    arguments; here any loop over a name `content` counts); an unreadable template is "string"."""
    try:
        from jinja2 import Environment, nodes
        tree = Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do"]).parse(template)
    except Exception:  # a tag of the tokenizer's own (HF's {% generation %}): its own environment
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template
            from jinja2 import nodes
            tree = _compile_jinja_template(template).environment.parse(template)
        except Exception:
            return False

    def mentions(node: Any, names: set[str]) -> bool:
        return (isinstance(node, nodes.Name) and node.name in names) or \
            any(n.name in names for n in node.find_all(nodes.Name))

    lists = {"messages"}
    for a in tree.find_all(nodes.Assign):  # {% set loop_messages = messages[1:] %}
        if isinstance(a.target, nodes.Name) and mentions(a.node, lists):
            lists.add(a.target.name)
    loops = list(tree.find_all(nodes.For))
    each = {f.target.name for f in loops if isinstance(f.target, nodes.Name) and mentions(f.iter, lists)}
    for f in loops:
        it = f.iter
        if isinstance(it, nodes.Name) and it.name == "content":
            return True
        key = it.attr if isinstance(it, nodes.Getattr) else \
            it.arg.value if isinstance(it, nodes.Getitem) and isinstance(it.arg, nodes.Const) else None
        if key == "content" and isinstance(it.node, nodes.Name) and it.node.name in each:
            return True
    return False


class HFTokenizer:
    def __init__(self, name_or_path: str, cache_tokens: int = 2_000_000):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise RuntimeError(f"models[].tokenizer {name_or_path!r} needs transformers "
                               "(pip install '.[cpu]' or vllm)") from e
        self.tok: Any = AutoTokenizer.from_pretrained(repo_path(name_or_path))
        if not getattr(self.tok, "chat_template", None):
            raise RuntimeError(f"tokenizer {name_or_path!r} has no chat template")
        self.tok.model_max_length = 1 << 62  # the gateway checks the model's context itself
        template = self.tok.chat_template if isinstance(self.tok.chat_template, str) else ""
        self.parts = _loops_over_content(template)  # vLLM's "openai" content format
        self.developer = '"developer"' in template or "'developer'" in template
        self.backend: Any = getattr(self.tok, "backend_tokenizer", None)
        self.split = _piecewise(self.backend) if self.backend is not None else None
        self.added: dict[str, int] = dict(self.tok.added_tokens_encoder)
        # (cache salt, piece) -> ids, least recently used first
        self.cache: OrderedDict[tuple[str | None, str], tuple[int, ...]] = OrderedDict()
        self.cache_tokens = cache_tokens
        self.cached_tokens = 0

    def chat(self, messages: tuple[dict[str, Any], ...], tools: tuple[dict[str, Any], ...] = (),
             template_kwargs: dict[str, Any] | None = None, salt: str | None = None) -> list[int]:
        kw = template_kwargs or {"add_generation_prompt": True}
        try:
            text = self.tok.apply_chat_template([self._as_vllm_passes(m) for m in messages],
                                                tools=list(tools) or None, tokenize=False, **kw)
        except Exception as e:  # the template refuses the conversation (roles out of order, ...)
            raise InvalidRequest(f"The chat template rejected the messages: {e}", param="messages") from None
        return self.ids(text, salt)

    def _as_vllm_passes(self, m: dict[str, Any]) -> dict[str, Any]:
        """A message as vLLM's server hands it to this template (content: a string, None, or
        a list of text strings, as the client sent it)."""
        c = m.get("content")
        texts = [c] if isinstance(c, str) else list(c or ())
        role = "system" if m["role"] == "developer" and not self.developer else m["role"]
        content: Any = [{"type": "text", "text": t} for t in texts] if self.parts and role != "tool" \
            else "\n".join(texts)
        return {**m, "role": role, "content": content}

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text).input_ids)

    def ids(self, text: str, salt: str | None = None) -> list[int]:
        """`text` tokenized as the model's tokenizer does, special tokens not added; pieces
        cached under `salt` (a tenant's cache salt)."""
        if self.split is None:
            return list(self.tok(text, add_special_tokens=False).input_ids)
        parts: list[Any] = []  # an added token's id, or a piece of text
        at = 0
        for m in self.split.finditer(text):
            if m.start() > at:
                parts.append(text[at:m.start()])
            parts.append(self.added[m.group()])
            at = m.end()
        if at < len(text):
            parts.append(text[at:])
        cache = self.cache
        todo = list(dict.fromkeys(p for p in parts if isinstance(p, str)
                                  and (len(p) < _MIN_CACHED or (salt, p) not in cache)))
        done = dict(zip(todo, (e.ids for e in self.backend.encode_batch(todo, add_special_tokens=False))))
        out: list[int] = []
        for p in parts:
            if not isinstance(p, str):
                out.append(p)
            elif p in done:
                out.extend(done[p])
            else:
                cache.move_to_end((salt, p))
                out.extend(cache[salt, p])
        for p, ids in done.items():
            if len(p) >= _MIN_CACHED and (salt, p) not in cache:
                cache[salt, p] = tuple(ids)
                self.cached_tokens += len(ids)
        while self.cached_tokens > self.cache_tokens and cache:
            self.cached_tokens -= len(cache.popitem(last=False)[1])
        return out
