"""OpenAI request schemas and response objects.

    parse_chat(body: bytes) -> Parsed          # POST /v1/chat/completions
    parse_completion(body: bytes) -> Parsed    # POST /v1/completions
    parse_tokenize(body) -> (Parsed, strs)     # POST /tokenize (vLLM's): either body
    parse_detokenize(body) -> DetokenizeRequest  # POST /detokenize

Every bad input becomes serving.errors.InvalidRequest (400) naming the field
in `param`: malformed JSON, wrong types, empty `messages`, `max_tokens` < 1,
unsupported options (`suffix`: refused, not silently dropped). Model existence and context length are checked
later by the pipeline, which knows the deployment. Unknown fields are ignored,
as vLLM's server does, so newer clients keep working.

Chat messages are rendered to one prompt with a fixed template, system prompt
first, so requests that share leading messages share a token prefix (and so
KV blocks).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Sequence, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from serving.engines.base import SAMPLING, PromptLogprob, TokenLogprob
from serving.errors import InvalidRequest
from serving.ingress.tools import guided_format

log = logging.getLogger(__name__)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """`null` for a field that cannot be null is the field left out, as OpenAI's and vLLM's
        servers take it (the SDK sends `"stream": null` for a `None` it was given)."""
        if isinstance(data, dict) and None in data.values():
            keep = _nullable(cls)
            return {k: v for k, v in data.items() if v is not None or k in keep}
        return data


@functools.cache
def _nullable(cls: type[BaseModel]) -> frozenset[str]:
    """The names (and aliases) of `cls`'s fields that take None as a value of their own; the
    others' None means unset."""
    names = set()
    for name, f in cls.model_fields.items():
        if not f.is_required() and f.default is None or _takes_none(f.annotation):
            names.update((name, f.alias or name))
    return frozenset(names)


def _takes_none(annotation: Any) -> bool:
    return annotation is None or type(None) in get_args(annotation)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: the usage so far in every chunk


class TextPart(_Body):
    type: Literal["text"]
    text: str


class RefusalPart(_Body):  # an assistant's earlier refusal, as OpenAI returns it
    type: Literal["refusal"]
    refusal: str

    @property
    def text(self) -> str:
        return self.refusal


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] | None = None  # JSON, as the model wrote it (or an object)
    _object: dict[str, Any] | None = PrivateAttr(default=None)

    def object(self) -> dict[str, Any]:
        """The arguments as an object, as vLLM gives them to a template: a string that is not a
        JSON object (a call cut by max_tokens, as the gateway itself may have returned it) is
        `{}`, so the conversation can go on; failing here would fail every later turn too."""
        if self._object is None:
            args = self.arguments
            if isinstance(args, str) and args:
                try:
                    args = json.loads(args)
                except ValueError:
                    log.warning("tool call %r has arguments that are not JSON (%d characters); "
                                "the template gets {}", self.name[:64], len(args))
                    args = None
            self._object = args if isinstance(args, dict) else {}
        return self._object


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | RefusalPart, Field(discriminator="type")]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: to which call
    reasoning: str | None = None  # an assistant's earlier thinking (vLLM's field; reasoning_content before)
    reasoning_content: str | None = None

    def text(self, sep: str) -> str:
        return sep.join(p.text for p in self.content) if isinstance(self.content, list) else self.content or ""

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v: Any) -> Any:
        for part in v if isinstance(v, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind not in ("text", "refusal"):
                raise ValueError(f"content parts of type `{kind}` are not supported: the models behind this "
                                 f"gateway take text (`text` parts)")
        return v


class Function(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: Function


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class JsonSchema(_Body):
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("`json_schema` is required when type is json_schema")
        return self


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs` extension: one constraint on the answer, for real engines'
    grammar engine (simulated ones honour json, json_object and choice)."""
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "StructuredOutputs":
        kinds = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise ValueError("only one kind of constraint can be used: json, regex, choice, grammar or json_object")
        if self.structural_tag is not None:
            raise ValueError("`structural_tag` is not supported by this gateway")
        return self


class _Common(_Body):
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=1, ge=1, le=128)  # choices, each its own engine request (as vLLM's)
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)  # vLLM's range (a 64-bit integer)
    stop: str | list[str] | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)  # vLLM's extensions from here
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    min_tokens: int | None = Field(default=None, ge=0)  # no end of sequence (or stop token id) before these
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] | None = Field(default=None, max_length=1024)
    response_format: ResponseFormat | None = None  # structured outputs on real engines
    structured_outputs: StructuredOutputs | None = None  # vLLM's extension (choice, regex, ...)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id -> bias
    # vLLM's sampling and detokenization extensions, passed on as set (None: not set)
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    allowed_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] | None = Field(default=None, max_length=1_000_000)
    bad_words: list[str] | None = Field(default=None, max_length=1024)
    # vLLM's: the prompt's token ids and each answer's, beside the text (RL trainers read them)
    return_token_ids: bool | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k in v or ():
            if not k.isdigit() or int(k) >= 2**31:
                raise ValueError(f"keys must be token ids, got {k[:32]!r}")
        return v


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=128)  # OpenAI's limit
    # vLLM's extensions for a model's own chat template
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the answer goes on from the last (assistant) message
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false}
    reasoning_effort: str | None = None  # to the template; "none" turns thinking off where it is a switch
    include_reasoning: bool = True  # vLLM's extension: false leaves a reasoning model's thinking out
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


TokenId = Annotated[int, Field(ge=0, lt=2**31)]  # token ids are hashed as 32-bit words


class CompletionRequest(_Common):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field()
    max_tokens: int | None = Field(default=16, ge=1, le=2**31 - 1)
    echo: bool = False
    suffix: str | None = None  # fill-in-the-middle: refused
    logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM: up to its max_logprobs (20)


@dataclass(frozen=True, slots=True)
class Parsed:
    """A validated request, whatever its endpoint."""

    kind: str  # "chat" | "completion"
    model: str
    prompt: str
    prompt_token_ids: tuple[int, ...] | None
    max_tokens: int | None  # None = the model's default
    stream: bool
    include_usage: bool
    temperature: float | None  # None: not set, the engine's default
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool = False
    sampling: tuple[tuple[str, Any], ...] = ()  # penalties, top_k, min_p, logit_bias as given
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI tool objects, for the template (and delegation)
    tool_choice: str = "none"  # "none" | "auto" | "required" | "function" (the one named `tool_name`)
    tool_name: str | None = None
    parallel_tool_calls: bool | None = None
    tool_format: dict[str, Any] | None = None  # the constraint tool_choice puts on the answer
    messages: tuple[dict[str, Any], ...] = ()  # chat: template messages, for a model's own template
    template_kwargs: dict[str, Any] | None = None  # chat: for apply_chat_template (generation prompt, ...)
    include_reasoning: bool = True
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's, one constraint (json, regex, choice, ...)
    logprobs: int | None = None  # None: none; k: each token's and its k most likely alternatives'
    continuous_usage: bool = False  # streamed: the usage so far in every chunk
    echo: bool = False  # completions: the prompt's text comes back before the answer
    n: int = 1  # choices: n engine requests over the one prompt (seed + i for choice i, as vLLM's)
    max_tokens_param: str = "max_tokens"  # the field the client set it with (chat: or max_completion_tokens)
    # vLLM's return_token_ids: the prompt's ids (chat: the response's `prompt_token_ids`, completions:
    # each choice's) and each choice's generated `token_ids`, streamed as deltas
    return_token_ids: bool = False


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


MAX_DEPTH = 128  # JSON nesting of what later stages recurse into (schemas, template kwargs): deeper is a 400
_RECURSED = ("tools", "response_format", "structured_outputs", "chat_template_kwargs")


def _load(body: bytes) -> Any:
    try:
        text = body.decode("utf-8-sig")  # strict: JSON on the wire is UTF-8 (RFC 8259; a BOM is let through)
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"The body of your request is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {e}") from None
    except RecursionError:
        raise InvalidRequest(f"The JSON body of your request is nested more than {MAX_DEPTH} levels deep.") from None
    if isinstance(raw, dict) and text.count("{") > MAX_DEPTH // 2:
        for key in _RECURSED:  # json.loads itself stops at ~1000 levels; these are walked further on
            if key in raw and _too_deep(raw[key]):
                raise InvalidRequest(f"`{key}` is nested more than {MAX_DEPTH} levels deep.", param=key)
    if _SURROGATE_ESCAPE.search(body):  # a \uD800-\uDFFF escape: fine in pairs, no text alone
        try:
            json.dumps(raw, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise InvalidRequest("The JSON body of your request has a lone surrogate escape (\\uD800-\\uDFFF "
                                 "without its pair): it is no Unicode text.") from None
    return raw


def _too_deep(raw: Any) -> bool:
    """Nested deeper than MAX_DEPTH (the stages after parsing recurse into schemas)."""
    stack = [(raw, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        if d > MAX_DEPTH:
            return True
        stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return False


# vLLM's request fields this gateway does not serve, with the value that means "not used":
# set to anything else they are a 400, not dropped (unknown fields are ignored, as vLLM's are)
_UNSERVED: dict[str, dict[str, Any]] = {
    "prompt_logprobs": {"*": None, "hint": "completions give the prompt's logprobs with `echo` and `logprobs`"},
    "return_token_offsets": {"*": False},
    "return_tokens_as_token_ids": {"*": False}, "logprob_token_ids": {"*": None},
    "truncate_prompt_tokens": {"*": None}, "truncation_side": {"*": None},
    "add_special_tokens": {"chat": False, "completion": True},
    "use_beam_search": {"*": False}, "length_penalty": {"*": 1.0},
    "cache_salt": {"*": None, "hint": "the gateway salts each tenant's prefix cache itself"},
    "kv_transfer_params": {"*": None}, "ec_transfer_params": {"*": None},
    "priority": {"*": 0}, "prompt_embeds": {"*": None}, "vllm_xargs": {"*": None},
    "thinking_token_budget": {"*": None}, "repetition_detection": {"*": None}, "watermarking": {"*": None},
    "chat_template": {"*": None, "hint": "the model's own template is configured (models[].tokenizer)"},
    "documents": {"*": None}, "mm_processor_kwargs": {"*": None}, "echo": {"chat": False},
    "return_prompt_text": {"*": False},
}


def _refuse_unserved(kind: str, raw: dict[str, Any]) -> None:
    for key in _UNSERVED.keys() & raw.keys():
        spec = _UNSERVED[key]
        if kind not in spec and "*" not in spec:
            continue
        unset, v = spec.get(kind, spec.get("*")), raw[key]
        if v is None or (v == unset and isinstance(v, bool) == isinstance(unset, bool)):
            continue  # not set, or set to what means "not used" (True is no 1.0 here)
        hint = f" ({spec['hint']})" if "hint" in spec else ""
        raise InvalidRequest(f"`{key}` (vLLM's option) is not supported by this gateway{hint}.", param=key)


def _validate(cls: type[_Body], body: bytes | dict[str, Any]) -> Any:
    raw = body if isinstance(body, dict) else _load(body)
    if not isinstance(raw, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if cls in (ChatRequest, CompletionRequest):
        _refuse_unserved("chat" if cls is ChatRequest else "completion", raw)
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(err.get("loc", ()))
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if param == "messages" and err.get("type") == "too_short":
            msg = "messages must contain at least one message"
        raise InvalidRequest(f"Invalid value for `{param}`: {msg}", param=param) from None


_BRANCHES = {"str", "int", "float", "bool", "none", "function-after"}


def _param(loc: tuple) -> str | None:
    """`messages.0.content`, dropping the union-branch tags pydantic adds (`str`, `list[int]`)."""
    out = []
    for p in loc:
        if isinstance(p, str) and ("[" in p or p in _BRANCHES):
            break
        out.append(str(p))
    return ".".join(out) or None


def _common(r: _Common) -> dict[str, Any]:
    if r.stream_options is not None and not r.stream:  # OpenAI's and vLLM's rule
        raise InvalidRequest("`stream_options` can only be set when `stream` is true.", param="stream_options")
    stop = (r.stop,) if isinstance(r.stop, str) else tuple(r.stop or ())
    return dict(model=r.model, stream=r.stream,
                include_usage=bool(r.stream and r.stream_options and r.stream_options.include_usage),
                continuous_usage=bool(r.stream and r.stream_options and r.stream_options.include_usage
                                      and r.stream_options.continuous_usage_stats),
                temperature=r.temperature, top_p=r.top_p, seed=r.seed, stop=stop,
                ignore_eos=r.ignore_eos, n=r.n or 1, return_token_ids=bool(r.return_token_ids),
                response_format=None if r.response_format is None else r.response_format.model_dump(
                    by_alias=True, exclude_none=True),
                structured_outputs=_structured(r),
                sampling=tuple((k, v) for k in SAMPLING if (v := getattr(r, k)) is not None)
                + ((("logit_bias", {int(k): v for k, v in r.logit_bias.items()}),) if r.logit_bias else ()))


def _structured(r: _Common) -> dict[str, Any] | None:
    """vLLM's structured_outputs as set (None: no constraint in it); alone, not beside a JSON
    response_format (vLLM would take one of the two)."""
    so = r.structured_outputs
    out = None if so is None else so.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True)
    if not out or not ({"json", "regex", "choice", "grammar", "json_object"} & out.keys()):
        return None
    if r.response_format is not None and r.response_format.type != "text":
        raise InvalidRequest("`structured_outputs` and a JSON `response_format` cannot be used together.",
                             param="structured_outputs")
    return out


def render_messages(messages: list[Message], tools: tuple[dict[str, Any], ...] = (),
                    generation_prompt: bool = True) -> str:
    """The word template: `<|role|> text` per message; tools and earlier calls as JSON text."""
    described = [{k: v for k, v in t["function"].items() if v is not None} for t in tools]
    parts = [f"<|tools|> {json.dumps(described)}"] if tools else []
    for m in messages:
        text = m.text(" ")
        for c in m.tool_calls or ():
            text += f' <tool_call> {{"name": {json.dumps(c.function.name)}, "arguments": {json.dumps(c.function.object())}}} </tool_call>'
        parts.append(f"<|{m.role}|> {text}")
    return " ".join(parts) + (" <|assistant|>" if generation_prompt else "")


def _tool(t: Tool) -> dict[str, Any]:
    """A tool as vLLM's server hands it to a chat template: description and parameters even when
    unset (null), strict only when set."""
    f = t.function
    fn = {"name": f.name, "description": f.description, "parameters": f.parameters}
    if f.strict is not None:
        fn["strict"] = f.strict
    return {"type": "function", "function": fn}


def _template_message(i: int, m: Message) -> dict[str, Any]:
    """A message for a model's own chat template: its content as sent (a string, None, or its
    text parts' texts; serving.ingress.hf_tokenizer shapes it as vLLM would for the template),
    and an assistant's tool-call arguments as objects, as tool-use templates expect them."""
    content = m.content if m.content is None or isinstance(m.content, str) else [p.text for p in m.content]
    out: dict[str, Any] = {"role": m.role, "content": content}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if (thought := m.reasoning if m.reasoning is not None else m.reasoning_content) is not None:
        out["reasoning"] = out["reasoning_content"] = thought  # both keys, as vLLM passes them
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": c.function.object()}}
                             for c in m.tool_calls]
    return out


# apply_chat_template's own arguments: the gateway sets them, a request's kwargs may not
_RESERVED = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "tokenize", "padding",
                       "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
                       "tokenizer_kwargs", "add_generation_prompt", "continue_final_message"})


def _template_kwargs(r: ChatRequest) -> dict[str, Any]:
    if r.add_generation_prompt and r.continue_final_message:
        raise InvalidRequest("Cannot set both `continue_final_message` and `add_generation_prompt` to true.",
                             param="continue_final_message")
    if r.continue_final_message and r.messages[-1].role != "assistant":
        raise InvalidRequest("`continue_final_message` needs an assistant message last.",
                             param="continue_final_message")
    given = r.chat_template_kwargs or {}
    if bad := sorted(_RESERVED & given.keys()):
        raise InvalidRequest(f"`chat_template_kwargs` may not set {bad}.", param="chat_template_kwargs")
    kw = {**given, "add_generation_prompt": r.add_generation_prompt,
          "continue_final_message": r.continue_final_message}
    if r.reasoning_effort is not None:  # as vLLM's server passes it on
        kw.setdefault("reasoning_effort", r.reasoning_effort)
        kw.setdefault("enable_thinking", r.reasoning_effort != "none")
    return kw


def _tool_choice(r: ChatRequest) -> tuple[str, str | None]:
    """(choice, function name): "auto" when tools are given and no choice, as OpenAI's default."""
    c = r.tool_choice
    if c is None:
        return ("auto" if r.tools else "none"), None
    if c != "none" and not r.tools:
        raise InvalidRequest("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    if isinstance(c, NamedToolChoice):
        if c.function.name not in {t.function.name for t in r.tools or ()}:
            raise InvalidRequest(f"Tool choice {c.function.name!r} is not one of the `tools`.",
                                 param="tool_choice.function.name")
        return "function", c.function.name
    return c, None


def parse_chat(body: bytes | dict[str, Any]) -> Parsed:
    r: ChatRequest = _validate(ChatRequest, body)
    if r.top_logprobs and not r.logprobs:
        raise InvalidRequest("`top_logprobs` needs `logprobs` set to true.", param="top_logprobs")
    choice, name = _tool_choice(r)
    if choice in ("required", "function") and r.response_format is not None and r.response_format.type != "text":
        raise InvalidRequest("A JSON `response_format` and a `tool_choice` that forces a call cannot be "
                             "used together.", param="response_format")
    if choice in ("required", "function") and _structured(r) is not None:
        raise InvalidRequest("`structured_outputs` and a `tool_choice` that forces a call cannot be "
                             "used together.", param="structured_outputs")
    tools = tuple(_tool(t) for t in r.tools or ())
    prompt = render_messages(r.messages, tools, r.add_generation_prompt)
    max_tokens = r.max_completion_tokens or r.max_tokens
    messages = tuple(_template_message(i, m) for i, m in enumerate(r.messages))
    return Parsed("chat", prompt=prompt, prompt_token_ids=None, max_tokens=max_tokens, **_common(r),
                  max_tokens_param="max_completion_tokens" if r.max_completion_tokens else "max_tokens",
                  tools=tools, tool_choice=choice, tool_name=name, parallel_tool_calls=r.parallel_tool_calls,
                  tool_format=guided_format(tools, choice, name, r.parallel_tool_calls), messages=messages,
                  template_kwargs=_template_kwargs(r), include_reasoning=r.include_reasoning,
                  logprobs=(r.top_logprobs or 0) if r.logprobs else None)


def parse_completion(body: bytes | dict[str, Any]) -> Parsed:
    r: CompletionRequest = _validate(CompletionRequest, body)
    if r.suffix:
        raise InvalidRequest("`suffix` is not supported.", param="suffix")
    ids: tuple[int, ...] | None = None
    p = r.prompt
    if isinstance(p, list) and (p == [] or p == [[]] or p == [""]):
        raise InvalidRequest("The prompt must not be empty.", param="prompt")
    if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
        ids, prompt = tuple(p), ""
    elif isinstance(p, list):
        if len(p) != 1:
            raise InvalidRequest("Exactly one prompt per request is supported (a batch is not: send "
                                 "one request each).", param="prompt")
        if isinstance(p[0], list):  # [[ids]]: one prompt of token ids
            ids, prompt = tuple(p[0]), ""
        else:
            prompt = str(p[0])
    else:
        prompt = p
    if not prompt and not ids:
        raise InvalidRequest("The prompt must not be empty.", param="prompt")
    return Parsed("completion", prompt=prompt, prompt_token_ids=ids, max_tokens=r.max_tokens, **_common(r),
                  logprobs=r.logprobs, echo=r.echo)


class DetokenizeRequest(_Body):
    model: str = Field(min_length=1)
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=1_000_000)


def parse_tokenize(body: bytes) -> tuple[Parsed, bool]:
    """POST /tokenize (vLLM's): a chat body (`messages`) or a completion body (`prompt`), as
    the model would get it; and whether the token strings are wanted (`return_token_strs`)."""
    raw = _load(body)
    if not isinstance(raw, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    strs = raw.pop("return_token_strs", False)
    if not isinstance(strs, bool):
        raise InvalidRequest("Invalid value for `return_token_strs`: Input should be a valid boolean",
                             param="return_token_strs")
    return (parse_chat(raw) if "messages" in raw else parse_completion(raw)), strs


def parse_detokenize(body: bytes) -> DetokenizeRequest:
    """POST /detokenize (vLLM's): `model` and `tokens`."""
    return _validate(DetokenizeRequest, body)


# --- response objects ---------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _finite(logprob: float | None) -> float | None:
    """-inf is no JSON number: vLLM's server writes -9999.0 for it."""
    return None if logprob is None else max(logprob, -9999.0)


def _token_ids(kind: str, event: dict[str, Any], choice: dict[str, Any], token_ids: Sequence[int] | None,
               prompt_token_ids: Sequence[int] | None) -> None:
    """vLLM's return_token_ids fields: the generated ids in the choice; the prompt's beside the
    choices for chat, in the choice for completions."""
    if prompt_token_ids is not None:
        (event if kind == "chat" else choice)["prompt_token_ids"] = list(prompt_token_ids)
    if token_ids is not None:
        choice["token_ids"] = list(token_ids)


class Responder:
    """Builds one request's response objects (ids and `created` fixed per request)."""

    __slots__ = ("kind", "id", "model", "created", "include_usage", "live_usage", "_offset", "top_logprobs")

    def __init__(self, kind: str, request_id: str, model: str, include_usage: bool = False,
                 created: int | None = None, top_logprobs: int = 0):
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time()) if created is None else created
        self.include_usage = include_usage
        self.live_usage: Callable[[], dict[str, Any]] | None = None  # continuous_usage_stats: the usage so far
        self._offset: dict[int, int] = {}  # completions' text_offset: characters of each choice described
        self.top_logprobs = top_logprobs  # chat: how many of each token's alternatives are shown

    def logprobs(self, lps: Sequence[TokenLogprob | PromptLogprob] | None, index: int = 0) -> dict[str, Any] | None:
        """Token log-probabilities in the endpoint's own shape (chat: `content`, completions:
        `tokens`/`token_logprobs`/`top_logprobs`/`text_offset`); None when not asked for. As vLLM's
        servers show a token's alternatives (itself, then the k most likely): completions all of
        them, chat the first `top_logprobs`."""
        if lps is None:
            return None
        if self.kind == "chat":
            return {"content": [{"token": t, "logprob": _finite(v), "bytes": list(t.encode()),
                                 "top_logprobs": [{"token": a, "logprob": _finite(b), "bytes": list(a.encode())}
                                                  for a, b in (top or ())[:self.top_logprobs]]}
                                for t, v, top in lps]}
        offsets = []
        offset = self._offset.get(index, 0)
        for t, _, _ in lps:
            offsets.append(offset)
            offset += len(t)
        self._offset[index] = offset
        # an echoed prompt's first token has neither (None)
        return {"tokens": [t for t, _, _ in lps], "token_logprobs": [_finite(v) for _, v, _ in lps],
                "top_logprobs": [None if top is None else {a: _finite(b) for a, b in top} for _, _, top in lps],
                "text_offset": offsets}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str, finish_reason: str | None, first: bool = False,
              tool_calls: list[dict[str, Any]] | None = None, reasoning: str = "",
              logprobs: Sequence[TokenLogprob] | None = None, index: int = 0,
              stop_reason: str | int | None = None, token_ids: Sequence[int] | None = None,
              prompt_token_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """One streamed event of choice `index` (`first`: that choice's first). With vLLM's
        return_token_ids: the event's generated `token_ids`, and on a choice's first event the
        prompt's (chat: beside `choices`, completions: in the choice), as vLLM's servers stream them."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            if reasoning:
                delta["reasoning"] = reasoning
            if tool_calls:
                delta["tool_calls"] = tool_calls
            if not text and (reasoning or tool_calls):
                delta["content"] = None
            d = self._head("chat.completion.chunk")
            d["choices"] = [{"index": index, "delta": delta, "logprobs": self.logprobs(logprobs, index),
                             "finish_reason": finish_reason, "stop_reason": stop_reason}]
        else:
            d = self._head("text_completion")
            d["choices"] = [{"index": index, "text": text, "logprobs": self.logprobs(logprobs, index),
                             "finish_reason": finish_reason, "stop_reason": stop_reason}]
        _token_ids(self.kind, d, d["choices"][0], token_ids, prompt_token_ids)
        if self.include_usage:
            d["usage"] = self.live_usage() if self.live_usage is not None else None
        return d

    def usage_chunk(self, u: dict[str, Any]) -> dict[str, Any]:
        d = self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        d["choices"] = []
        d["usage"] = u
        return d

    def choice(self, index: int, text: str, finish_reason: str | None,
               tool_calls: list[dict[str, Any]] | None = None, reasoning: str = "",
               logprobs: Sequence[TokenLogprob] | None = None,
               stop_reason: str | int | None = None, token_ids: Sequence[int] | None = None,
               prompt_token_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """One whole choice of a non-streamed response (`stop_reason`: vLLM's, the stop string or
        stop token id that ended it; `token_ids`, `prompt_token_ids`: vLLM's return_token_ids, the
        prompt's in the choice for completions, beside the choices for chat (`response`))."""
        if self.kind != "chat":
            c = {"index": index, "text": text, "logprobs": self.logprobs(logprobs, index),
                 "finish_reason": finish_reason, "stop_reason": stop_reason}
            _token_ids(self.kind, {}, c, token_ids, prompt_token_ids)
            return c
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning:
            msg["reasoning"] = reasoning
            msg["content"] = text or None  # all thinking, no answer: null, as vLLM's
        if tool_calls:  # whole calls, without the streaming `index`
            msg["content"] = text or None
            msg["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in tool_calls]
        c = {"index": index, "message": msg, "logprobs": self.logprobs(logprobs, index),
             "finish_reason": finish_reason, "stop_reason": stop_reason}
        _token_ids(self.kind, {}, c, token_ids, None)  # the prompt's go beside the choices (`response`)
        return c

    def response(self, choices: list[dict[str, Any]], u: dict[str, Any],
                 prompt_token_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """The non-streamed response: its `choices` (from `choice`), and the usage (and for chat
        with return_token_ids, the prompt's ids)."""
        d = self._head("chat.completion" if self.kind == "chat" else "text_completion")
        d["choices"] = choices
        d["usage"] = u
        if prompt_token_ids is not None and self.kind == "chat":
            d["prompt_token_ids"] = list(prompt_token_ids)
        return d

    def full(self, text: str, finish_reason: str | None, u: dict[str, Any],
             tool_calls: list[dict[str, Any]] | None = None, reasoning: str = "",
             logprobs: Sequence[TokenLogprob] | None = None) -> dict[str, Any]:
        """A non-streamed response of one choice."""
        return self.response([self.choice(0, text, finish_reason, tool_calls, reasoning, logprobs)], u)
