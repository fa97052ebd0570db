"""Tool calling: OpenAI's `tools` and `tool_choice` on any engine, as vLLM's server does it.

    guided_format(tools, choice, name, parallel) -> response_format | None
    ToolOutput.make(choice, name, parser, parallel, stream) -> ToolOutput | None
    out.feed(text) -> (content, tool_call_deltas)       # as the answer streams
    out.end() -> (content, tool_call_deltas)            # at its end
    out.finish_reason(engine_reason) -> str

The tools reach the model in its prompt (its own chat template, or the gateway's
word template). What comes back depends on `tool_choice`:

- a named function: the answer is constrained (structured outputs) to the
  function's `parameters` schema and is that call's `arguments`, streamed as
  they come; finish_reason `stop`, as OpenAI's;
- `required`: the answer is constrained to a JSON array of
  `{"name", "parameters"}` objects, one per call; each is sent as a tool call
  as soon as it is complete; finish_reason `tool_calls`;
- `auto` with the model's `tool_parser` configured, finish_reason `tool_calls`
  if the model called any:
  - `hermes`: the model writes `<tool_call>{"name": ..., "arguments": {...}}
    </tool_call>`, as Qwen2.5/3 and Hermes models do. Text outside the tags
    streams as content. Streamed, a call is sent as vLLM's parser sends it:
    its name as soon as it is written (when it comes first, as the models
    write it), then its arguments as they come; once sent, a call stays a
    call, even one cut by max_tokens. Not streamed, or with the name after
    the arguments, it is sent whole when its closing tag arrives;
  - `llama3_json`: an answer that opens with `{` (or `<|python_tag|>`) is one
    or more `{"name": ..., "parameters": {...}}` objects, separated by `;`, as
    Llama 3.1-3.3 write them; any other answer streams as content. Streamed,
    each call is sent as the hermes ones are (name, then parameters as they
    come), and text after the calls that is no call is content; not
    streamed, it is read when complete;
  - `qwen3_coder`: `<tool_call><function=NAME><parameter=KEY>value
    </parameter>...</function></tool_call>`, as Qwen3-Coder writes them; each
    value is typed by the tool's parameter schema as vLLM's parser types it
    (an integer, a boolean, JSON for objects and arrays; a string otherwise).
    Streamed, a call's name leaves when written and each parameter when whole;
  - `pythonic`: an answer that opens with `[` (inside `<|python_start|>` and
    `<|python_end|>` for Llama 4) is `[name(key=value, ...), ...]` with
    Python literal values, as Llama 3.2 and 4 write them with vLLM's pythonic
    tool templates; read with Python's
    own parser (`ast`), never run. Streamed, each call leaves whole when its
    `)` is written; not streamed, the whole answer is the list or it is
    content (vLLM's rule);
- `none`: the answer is content. `auto` on a model with no parser is a 400
  (pipeline.bind), as on vLLM's server: its calls would be lost as text.

An answer that does not parse (a model that ignored the format, or one cut by
`max_tokens`) is returned as content, never dropped. Simulated engines write
JSON of the schema under structured outputs (serving.engines.sim_json), so
named and required calls come back as calls; under `auto` they write words,
which are content. The parsing state lives in the ingress, so a stream that fails
over to another replica mid-call goes on parsing where it was.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from typing import Any

from serving.errors import InvalidRequest

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_PY_START, _PY_END = "<|python_start|>", "<|python_end|>"  # pythonic, as Llama 4 wraps its calls
_DECODER = json.JSONDecoder()
# the start of a call whose name comes first and whose arguments (or parameters) are an object
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')
_BETWEEN = re.compile(r"(?:\s|;)*")  # llama3_json: what separates calls
# qwen3_coder: <function=NAME> <parameter=KEY>VALUE</parameter>... </function>; a parameter whose
# closing tag is missing ends at the next parameter or the function's end (at the block's end, there)
_FUNCTION = re.compile(r"<function=([^>\n]*)>")
_FUNCTION_END, _PARAMETER_END = "</function>", "</parameter>"
_PARAMETER = re.compile(r"<parameter=([^>\n]*)>")
_VALUE_ENDS = (_PARAMETER_END, "<parameter=", _FUNCTION_END)
_LONGEST_END = max(map(len, _VALUE_ENDS))
_TEXT_TYPES = ("string", "str", "text", "varchar", "char", "enum")


def _params(fn: dict[str, Any]) -> dict[str, Any]:
    # no parameters still means a JSON object of arguments (vLLM's rule)
    return dict(fn.get("parameters") or {"type": "object", "properties": {}})


def guided_format(tools: tuple[dict[str, Any], ...], choice: str, name: str | None,
                  parallel: bool | None) -> dict[str, Any] | None:
    """The structured-output constraint a tool choice puts on the answer (None: free text)."""
    fns = {t["function"]["name"]: t["function"] for t in tools}
    if choice == "function":
        return {"type": "json_schema", "json_schema": {"name": name, "schema": _params(fns[name])}}
    if choice != "required":
        return None
    defs: dict[str, Any] = {}
    one_of = []
    for fname, fn in fns.items():
        params = _params(fn)
        for k, v in (params.pop("$defs", None) or {}).items():  # $ref targets live at the root
            if defs.setdefault(k, v) != v:
                raise InvalidRequest(f"Tool definition {k!r} has two different schemas in `$defs`.",
                                     param="tools")
        one_of.append({"properties": {"name": {"type": "string", "enum": [fname]}, "parameters": params},
                       "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": one_of}}
    if parallel is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return {"type": "json_schema", "json_schema": {"name": "tool_calls", "schema": schema}}


_REQUIRED = object()


def _written_call(obj: Any, no_arguments: Any = _REQUIRED) -> tuple[str, str]:
    """A call the model wrote as JSON: its name, and its `arguments` (or `parameters`, as Llama
    writes them) as a JSON string; without either, `no_arguments`, or a KeyError."""
    if "arguments" in obj:
        args = obj["arguments"]
    elif "parameters" in obj or no_arguments is _REQUIRED:
        args = obj["parameters"]
    else:
        args = no_arguments
    return obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def reads_tags(choice: str, parser: str | None) -> bool:
    """The answer is read for calls by the model's parser: the engine must keep the special
    tokens the tags may be (skip_special_tokens false)."""
    return choice == "auto" and parser is not None


def _call(index: int, name: str, arguments: str) -> dict[str, Any]:
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def whole_calls(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streamed tool-call deltas joined into whole calls, as a client joins them."""
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        c = calls.get(d["index"])
        if c is None:
            calls[d["index"]] = {**d, "function": dict(d["function"])}
        else:
            c["function"]["arguments"] += d["function"].get("arguments", "")
    return [calls[i] for i in sorted(calls)]


def held(text: str, tag: str) -> int:
    """How many trailing characters of `text` could begin `tag` (to be held back until known)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class _Arguments:
    """A JSON object read as it grows: a streamed call's arguments (where they start in the
    answer's text, how much of them was sent), or a call's whole object (`whole`, only scanned);
    how far it was scanned for its closing brace."""

    __slots__ = ("index", "whole", "sent", "scan", "depth", "in_str", "esc", "closed")

    def __init__(self, index: int, start: int, whole: bool = False):
        self.index, self.whole = index, whole  # index -1: a call not sent yet
        self.sent, self.scan = start, start
        self.depth, self.in_str, self.esc, self.closed = 0, False, False, False

    def fragment(self, body: str) -> list[dict[str, Any]]:
        """The arguments' text written since the last fragment, up to their closing brace."""
        i = self.advance(body)
        text, self.sent = body[self.sent:i], i
        return [{"index": self.index, "function": {"arguments": text}}] if text else []

    def advance(self, body: str) -> int:
        """Scan what was written since; where the object's text ends so far (just after its
        closing brace once `closed`)."""
        i, depth, in_str, esc = self.scan, self.depth, self.in_str, self.esc
        n = len(body)
        while i < n and not self.closed:
            ch = body[i]
            i += 1
            if in_str:
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                self.closed = depth == 0
        self.scan, self.depth, self.in_str, self.esc = i, depth, in_str, esc
        return i


class _XmlBlock:
    """qwen3_coder: one <tool_call> block read as it grows: where reading goes on, the function
    being read (its name, its call's index once its header was sent, its parameters so far),
    whether it had any function."""

    __slots__ = ("at", "name", "index", "params", "seen", "key", "scan")

    def __init__(self) -> None:
        self.at, self.name, self.index, self.params, self.seen = 0, None, -1, {}, False
        self.key: str | None = None  # the parameter whose value is being read (it starts at `at`)
        self.scan = 0  # how far that value was searched for its end


def _xml_value(schema: Any, raw: str) -> Any:
    """A qwen3_coder parameter's text as the JSON value its schema's type says, as vLLM's parser
    converts it (one newline each side is the tag's; `null` is null; what does not convert
    stays a string)."""
    v = raw[1:] if raw.startswith("\n") else raw
    v = v[:-1] if v.endswith("\n") else v
    if v.lower() == "null":
        return None
    kind = schema.get("type", "string") if isinstance(schema, dict) else "string"
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    kind = str(kind).lower()
    try:
        if kind in _TEXT_TYPES:
            return v
        if kind.startswith(("int", "uint")) or kind in ("long", "short"):
            return int(v)
        if kind.startswith(("num", "float")) or kind == "double":
            f = float(v)
            return int(f) if f.is_integer() else f
        if kind in ("boolean", "bool", "binary"):
            return v.lower() == "true" if v.lower() in ("true", "false") else v
        if kind.startswith(("object", "array", "arr", "dict", "list")):
            return json.loads(v)
    except (ValueError, OverflowError):
        pass
    return v


class _PyScan:
    """pythonic: the list `[call(...), ...]` read as it grows, quotes and brackets counted, so a
    call is known whole at the `)` that closes it."""

    __slots__ = ("at", "depth", "quote", "item_start", "last", "closed")

    def __init__(self, at: int):
        self.at = at  # where reading goes on (just after the list's "[" at first)
        self.depth = 0  # brackets open inside the current item
        self.quote = ""  # the quote of the string being read ("" outside strings)
        self.item_start = -1  # where the current item began (-1: between items)
        self.last = at  # where the item last returned began
        self.closed = False  # the list's "]" was read

    def next_item(self, buf: str) -> str | None:
        """The next whole item's text, "]" at the list's end, None if more must come first."""
        i, n = self.at, len(buf)
        while i < n:
            c = buf[i]
            if self.quote:
                if c == "\\":
                    if i + 1 >= n:
                        break  # what it escapes is still coming: read on from the backslash
                    i += 2
                    continue
                if c == self.quote:
                    self.quote = ""
            elif self.item_start < 0:  # between items
                if c in " \t\r\n,":
                    pass
                elif c == "]":
                    self.at, self.closed = i + 1, True
                    return "]"
                else:
                    self.item_start = i
                    continue
            elif c in "'\"":
                self.quote = c
            elif c in "([{":
                self.depth += 1
            elif c in ")]}":
                self.depth -= 1
                if self.depth <= 0:
                    item, self.last, self.item_start, self.depth = buf[self.item_start:i + 1], self.item_start, -1, 0
                    self.at = i + 1
                    return item
            elif c == "," and self.depth == 0:  # an item that is no call (a bare name, a number)
                item, self.last, self.item_start = buf[self.item_start:i], self.item_start, -1
                self.at = i
                return item
            i += 1
        self.at = min(i, n)
        return None


_JSON_NAMES = {"true": True, "false": False, "null": None}  # JSON's words, as small models write them


def _py_value(node: ast.expr) -> Any:
    """A call argument's value as vLLM's pythonic parser reads it: literals (strings, numbers,
    True/False/None and JSON's true/false/null, signed numbers, placeholder-free f-strings),
    dicts with literal keys, and lists, tuples and sets as JSON arrays; anything else raises."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float))):
        return node.value
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) for k in node.keys):
        return {k.value: _py_value(v) for k, v in zip(node.keys, node.values)}  # type: ignore[union-attr]
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_py_value(v) for v in node.elts]
    if isinstance(node, ast.JoinedStr) and all(isinstance(v, ast.Constant) for v in node.values):
        return "".join(str(v.value) for v in node.values)  # type: ignore[attr-defined]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _py_value(node.operand)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
    raise ValueError("not a literal")


def _py_name(node: ast.expr) -> str:
    """A call's function: a name, or a dotted one (`tools.search`)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise ValueError("not a function name")
    return ".".join([node.id, *reversed(parts)])


def _python_call(text: str) -> tuple[str, str] | None:
    """`name(key=value, ...)` as (name, arguments as JSON), read as vLLM's pythonic parser reads
    it (`_py_value`); None if it is not such a call. The text is parsed, never run."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
            return None  # positional arguments and **kwargs are not the format
        args = {k.arg: _py_value(k.value) for k in node.keywords}
        return _py_name(node.func), json.dumps(args, ensure_ascii=False, allow_nan=False)  # (1e999 is no JSON)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None


class ToolOutput:
    """One answer's text turned into content and tool calls, chunk by chunk."""

    __slots__ = ("mode", "name", "parallel", "stream", "calls", "names", "_buf", "_parts", "_at", "_inside",
                 "_seen", "_json", "_args", "_xml", "_schemas", "_scan")

    def __init__(self, mode: str, name: str | None = None, parallel: bool | None = None, stream: bool = False,
                 tools: tuple[dict[str, Any], ...] = ()):
        # "function" (named) | "required" | a parser: "hermes" | "llama3_json" | "qwen3_coder";
        # "content": no calls to read
        self.mode = mode
        self.name = name
        self.parallel = parallel
        self.stream = stream  # the parsers: send a call as it is written (not only whole)
        self.calls = 0  # tool calls sent so far
        self.names: list[str] = []  # their functions, in order (agent-step records)
        self._buf = ""
        self._parts: list[str] = []  # llama3_json calls: the answer so far, joined at the end
        self._at = -1  # required: where the next array item starts in _buf (-1: before the "[")
        self._inside = False  # hermes: between <tool_call> and </tool_call>
        self._seen = 0  # hermes, inside a call: how much of it was searched for </tool_call>
        self._json: bool | None = None  # llama3_json: the answer is calls (None: not known yet)
        self._args: _Arguments | None = None  # hermes and llama3_json, streamed: the call being read
        self._xml: _XmlBlock | None = None  # qwen3_coder: the <tool_call> block being read
        self._scan: _PyScan | None = None  # pythonic: the list of calls being read
        # qwen3_coder: each function's parameters' schemas (their values are typed by them)
        self._schemas = {t["function"]["name"]: (t["function"].get("parameters") or {}).get("properties") or {}
                         for t in tools} if mode == "qwen3_coder" else {}

    @classmethod
    def make(cls, choice: str, name: str | None, parser: str | None, parallel: bool | None,
             stream: bool = False, tools: tuple[dict[str, Any], ...] = ()) -> "ToolOutput | None":
        if choice in ("function", "required"):
            return cls(choice, name, parallel)
        if reads_tags(choice, parser):
            return cls(parser, None, parallel, stream, tools)
        return None

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        if self.mode == "content":
            return text, []
        if self.mode == "function":
            if self.calls == 0:
                self.calls = 1
                self.names.append(self.name or "")
                return "", [_call(0, self.name or "", text)]
            return "", [{"index": 0, "function": {"arguments": text}}] if text else []
        if self._json and not self.stream:  # llama3_json, pythonic: read whole, at the end
            self._parts.append(text)
            return "", []
        self._buf += text
        if self.mode == "required":
            return self._array(final=False, new=text)
        if self.mode == "llama3_json":
            return self._llama(final=False)
        if self.mode == "pythonic":
            return self._pythonic(final=False)
        return self._hermes(final=False)

    def end(self) -> tuple[str, list[dict[str, Any]]]:
        if self.mode == "content":
            return "", []
        if self.mode == "function":
            return self.feed("") if self.calls == 0 else ("", [])
        if self.mode == "required":
            return self._array(final=True, new="")
        if self.mode == "llama3_json":
            return self._llama(final=True)
        if self.mode == "pythonic":
            return self._pythonic(final=True)
        return self._hermes(final=True)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        if self.calls and self.mode != "function" and engine_reason == "stop":
            return "tool_calls"
        return engine_reason

    def _numbered(self, calls: list[tuple[str, str]]) -> list[dict[str, Any]]:
        out = []
        for name, args in calls:
            if self.parallel is False and self.calls:
                break  # parallel_tool_calls false: the first call only
            out.append(_call(self.calls, name, args))
            self.names.append(name)
            self.calls += 1
        return out

    def _hermes(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        content: list[str] = []
        calls: list[tuple[str, str]] = []
        sent: list[dict[str, Any]] = []  # deltas of calls streamed as they come

        def text(t: str) -> None:
            if t.strip() or not (self.calls or calls):  # whitespace between calls is not content
                content.append(t)

        buf = self._buf
        while buf or (final and self._inside):  # (a lone <tool_call> at the end is text)
            if not self._inside:
                i = buf.find(_OPEN)
                if i < 0:
                    keep = 0 if final else held(buf, _OPEN)
                    text(buf[:len(buf) - keep])
                    buf = buf[len(buf) - keep:]
                    break
                text(buf[:i])
                buf, self._inside = buf[i + len(_OPEN):], True
                continue
            j = buf.find(_CLOSE, max(0, self._seen - len(_CLOSE) + 1))
            if j < 0 and not final:
                self._seen = len(buf)
                if self.mode == "qwen3_coder" and self.stream:
                    sent += self._functions(buf, False, calls)
                elif self.stream:
                    sent += self._streamed(buf, calls)
                break  # the call is still coming
            self._seen = 0
            body = buf if j < 0 else buf[:j]
            rest = "" if j < 0 else buf[j + len(_CLOSE):]
            as_text = _OPEN + body + ("" if j < 0 else _CLOSE)  # if it is no call: the text as it was
            if self.mode == "qwen3_coder":
                sent += self._functions(body, True, calls)
                if not self._xml.seen:  # type: ignore[union-attr]
                    content.append(as_text)
                self._xml = None
            else:
                if self.stream:
                    sent += self._streamed(body, calls)
                if self._args is not None:  # sent as it came: the rest of its arguments went just now
                    self._args = None
                else:
                    try:
                        calls.append(_written_call(json.loads(body), no_arguments={}))
                    except (ValueError, TypeError, KeyError, AttributeError):
                        content.append(as_text)
            buf, self._inside = rest, False
        self._buf = buf
        return "".join(content), sent + self._numbered(calls)

    def _functions(self, body: str, closed: bool, calls: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """qwen3_coder: the functions of a <tool_call> block read so far. Streamed, a call's header
        leaves when its `<function=NAME>` is written and each parameter when it is whole; the
        call's arguments are a JSON object of them. Not streamed, each call joins `calls` whole
        when its function ends (or its block does: a function cut short keeps its whole
        parameters)."""
        x = self._xml = self._xml or _XmlBlock()
        out: list[dict[str, Any]] = []
        while True:
            if x.name is None:
                m = _FUNCTION.search(body, x.at)
                if m is None:
                    return out
                x.name, x.params, x.at, x.index, x.seen = m.group(1).strip(), {}, m.end(), -1, True
                if self.stream and not (self.parallel is False and (self.calls or calls)):
                    out += self._numbered(calls)  # whole calls before it keep their order
                    calls.clear()
                    header = self._numbered([(x.name, "")])
                    out += header
                    x.index = header[0]["index"]
                continue
            if x.key is None:  # between parameters: the next one, or the function's end
                m = _PARAMETER.search(body, x.at)
                end = body.find(_FUNCTION_END, x.at)
                if m is not None and (end < 0 or m.start() < end):
                    x.key, x.at, x.scan = m.group(1).strip(), m.end(), m.end()
                    continue
                if end < 0 and not closed:
                    return out  # the function is still coming
                if x.index >= 0:
                    out.append({"index": x.index, "function": {"arguments": "}" if x.params else "{}"}})
                else:
                    calls.append((x.name, json.dumps(x.params, ensure_ascii=False)))
                x.name, x.at = None, len(body) if end < 0 else end + len(_FUNCTION_END)
                continue
            # in a parameter's value: it ends at its closing tag, the next parameter or the
            # function's end; only the text written since the last look is searched
            ends = [(i, t) for t in _VALUE_ENDS if (i := body.find(t, max(x.at, x.scan - _LONGEST_END + 1))) >= 0]
            if not ends and not closed:
                x.scan = len(body)
                return out
            i, tag = min(ends) if ends else (len(body), "")
            value = _xml_value(self._schemas.get(x.name, {}).get(x.key), body[x.at:i])
            if x.index >= 0:
                piece = ("{" if not x.params else ", ") + json.dumps(x.key, ensure_ascii=False) + ": " + \
                    json.dumps(value, ensure_ascii=False)
                out.append({"index": x.index, "function": {"arguments": piece}})
            x.params[x.key] = value
            x.key, x.at = None, i + (len(tag) if tag == _PARAMETER_END else 0)

    def _streamed(self, body: str, calls: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """hermes, streamed: a call's header as soon as its name is written, then its arguments."""
        if self._args is not None:
            return self._args.fragment(body)
        if self.parallel is False and calls:
            return []
        earlier = self._numbered(calls)  # whole calls before it keep their order
        calls.clear()
        return earlier + self._header(body, 0)

    def _header(self, text: str, at: int) -> list[dict[str, Any]]:
        """A call that starts at `at` with its name, then an object of arguments: its header and
        the arguments written so far, and it is the call being sent. [] if its start is not that
        shape, not complete enough to tell, or a call parallel_tool_calls false does not want."""
        m = _HEAD.match(text, at)
        if m is None or (self.parallel is False and self.calls):
            return []
        try:
            name = json.loads('"' + m.group(1) + '"')
        except ValueError:
            return []
        (header,) = self._numbered([(name, "")])
        self._args = _Arguments(header["index"], m.end())
        return [header] + self._args.fragment(text)

    def _array(self, final: bool, new: str) -> tuple[str, list[dict[str, Any]]]:
        """`required`: each `{"name", "parameters"}` item of the array as soon as it is whole."""
        buf = self._buf
        if self._at < 0:
            head = buf.lstrip()
            if not head:
                self._buf = "" if final else buf
                return (buf if final else ""), []
            if head[0] != "[":  # not the array it was constrained to (a simulated engine): content
                self.mode, self._buf = "content", ""
                return buf, []
            self._at = len(buf) - len(head) + 1
        if "}" not in new and not final:
            return "", []  # an item can only be complete at a "}"
        calls = []
        while True:
            rest = buf[self._at:].lstrip().removeprefix(",").lstrip()
            start = len(buf) - len(rest)
            if not rest or rest[0] == "]":
                break
            try:
                item, end = _DECODER.raw_decode(buf, start)
                calls.append((item["name"], json.dumps(item["parameters"], ensure_ascii=False)))
            except (ValueError, TypeError, KeyError):
                break  # not complete yet (or not an item)
            self._at = end
        out = self._numbered(calls)
        if final:  # what is left: an item cut by max_tokens, or text that is no item
            rest = buf[self._at:].strip().removeprefix(",").strip()
            self._buf = ""
            if not self.calls:  # no call read: the text as it was
                return buf, out
            return ("" if rest in ("", "]") else rest), out
        return "", out

    def _llama(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        if self._json is None:
            head = self._buf.lstrip()
            if head.startswith(("{", _PYTHON_TAG)):
                self._json = True
                if self.stream:  # read as it comes, from after the tag
                    self._at = len(self._buf) - len(head.removeprefix(_PYTHON_TAG))
                else:
                    self._parts.append(self._buf)
                    self._buf = ""
            elif (not head or _PYTHON_TAG.startswith(head)) and not final:
                return "", []  # not known yet
            else:
                self._json = False
        if not self._json:
            text, self._buf = self._buf, ""
            return text, []
        if self.stream:
            return self._llama_streamed(final)
        if not final:
            return "", []
        text, self._parts = "".join(self._parts), []
        rest = text.strip().removeprefix(_PYTHON_TAG).lstrip()
        calls = []
        try:
            while rest:
                obj, end = _DECODER.raw_decode(rest)
                calls.append(_written_call(obj))
                rest = rest[end:].lstrip().removeprefix(";").lstrip()
        except (ValueError, TypeError, KeyError, AttributeError):
            return text, []  # not calls after all: the text as it was
        if not calls:
            return text, []  # no call in it (a lone <|python_tag|>): the text as it was
        return "", self._numbered(calls)

    def _llama_streamed(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """llama3_json, streamed: each call's name as soon as it is written, then its parameters
        as they come; a call of another shape when its object is whole. Once the answer turns
        out to hold text that is no call, the rest is content."""
        buf, out = self._buf, []
        while True:
            call = self._args
            if call is None:  # between calls
                self._at = _BETWEEN.match(buf, self._at).end()
                if self._at == len(buf):  # (at the end with no call at all: the text, a lone tag say)
                    return self._no_more_calls(buf, out) if final and not self.calls else ("", out)
                call = self._args = _Arguments(-1, self._at, whole=True)
            if call.index < 0:  # is it a call whose name comes first? (known once enough is written)
                header = self._header(buf, self._at)
                out += header
                call = self._args if header else call
            if not call.whole:  # its parameters, as they come; then the rest of its object
                out += call.fragment(buf)
                if not call.closed:
                    break
                call = self._args = _Arguments(call.index, self._at, whole=True)
            end = call.advance(buf)
            if not call.closed:
                break
            if call.index < 0:  # not sent as it came: the whole object, if it is a call
                try:
                    out += self._numbered([_written_call(_DECODER.decode(buf[self._at:end]))])
                except (ValueError, TypeError, KeyError, AttributeError):
                    return self._no_more_calls(buf, out)
            self._args, self._at = None, end
        if final and self._args.index < 0:  # cut before it was known as a call
            return self._no_more_calls(buf, out)
        return "", out  # a call still coming (or, at the end, cut after it was sent)

    def _pythonic(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """pythonic: an answer that opens with `[` (after an optional `<|python_start|>`) is a list
        of calls, `[name(key=value, ...), ...]`, values Python literals, as Llama 3.2 and 4
        write them with vLLM's pythonic templates; any other answer is content. Streamed, each call leaves whole once the `)`
        that closes it is written; not streamed, the answer is read when it ends (vLLM's rule
        there: the whole answer is the list, or it is all content). Streamed, text that is no
        call ends the calls and is content from there (all of it if no call was sent)."""
        buf = self._buf
        if self._json is None:
            head = buf.lstrip()
            if head.startswith(_PY_START):
                head = head[len(_PY_START):].lstrip()
            if head.startswith("["):
                self._json, self._scan = True, _PyScan(len(buf) - len(head) + 1)
            elif not final and _PY_START.startswith(buf.lstrip()):
                return "", []  # not known yet (nothing but blanks, or the tag's first characters)
            else:
                self._json = False
        if not self._json:
            self._buf = ""
            return buf, []
        if not self.stream and not final:
            return "", []
        if self._parts:  # not streamed: the rest of the answer, joined once at its end
            buf = self._buf = buf + "".join(self._parts)
            self._parts = []
        scan = self._scan
        assert scan is not None
        found: list[tuple[str, str]] = []
        while not scan.closed:
            item = scan.next_item(buf)
            if item is None:
                break
            if item == "]":
                continue
            call = _python_call(item)
            if call is None:
                return self._py_text(buf, found, scan.last)
            found.append(call)
        if scan.closed:  # after the list only its end tag may come
            rest = buf[scan.at:].strip()
            if rest.startswith(_PY_END):
                rest = rest[len(_PY_END):].strip()
            elif not final and _PY_END.startswith(rest):
                rest = ""  # nothing yet, or the tag's first characters
            if rest or not (self.calls or found):  # (an empty list is no call: text)
                return self._py_text(buf, found, scan.at)
        elif final:  # cut before the list closed (max_tokens): what is not a whole call is text
            return self._py_text(buf, found, scan.item_start if scan.item_start >= 0 else scan.at)
        return "", self._numbered(found)

    def _py_text(self, buf: str, found: list[tuple[str, str]], at: int) -> tuple[str, list[dict[str, Any]]]:
        """pythonic: the answer holds text that is no call from `at`. Not streamed, or before any
        call was sent, all of the answer is content (vLLM's rule); streamed after calls, the
        rest is, and so is everything after it."""
        self._json, self._buf = False, ""
        if not self.stream or not (self.calls or found):
            return buf, []
        return buf[at:], self._numbered(found)

    def _no_more_calls(self, buf: str, out: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
        """llama3_json, streamed: text that is no call; from here on the answer is content (all of it
        if no call was sent)."""
        text = buf[self._at:] if self.calls else buf
        self._json, self._buf, self._args = False, "", None
        return text, out
