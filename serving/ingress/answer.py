"""How a chat answer's text leaves the gateway: reasoning, content and tool calls.

    reader = AnswerReader.make(parsed, tool_parser, reasoning_parser)  # None: all content
    reader.take(text, finish_reason) -> Part(content, reasoning, tool_calls)  # chunk by chunk
    reader.end() -> Part                                               # what is held back, once
    reader.finish_reason(engine_reason) -> str

A reasoning model writes its thinking first, between `<think>` and `</think>`;
with the model's `reasoning_parser` set, that text leaves as the message's
`reasoning` (vLLM's field), the rest as content, and tool calls are read from
the content only (serving.ingress.tools), as vLLM's server does it:

- `deepseek_r1`: the answer is reasoning until `</think>` (its template opens
  the `<think>` in the prompt; a `<think>` the model writes is dropped); an
  answer that never closes it is all reasoning;
- `qwen3`: the answer is reasoning only if it opens with `<think>`, until
  `</think>`; otherwise (thinking switched off) it is all content.

The whitespace between `</think>` and the answer belongs to neither. An answer
constrained to JSON (a forced tool call, a JSON `response_format`) that opens
with JSON is all content: its engine applied structured outputs from the first
token (vLLM started without the reasoning parser). One that opens otherwise was
let think first (vLLM started with it): the parser's rules apply.

Tags split across chunks are held back until they are whole. `include_reasoning:
false` (vLLM's extension) drops the reasoning from the response.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serving.delegation.cascade import is_json_format
from serving.ingress.tools import ToolOutput, held

if TYPE_CHECKING:
    from serving.ingress.openai_api import Parsed

_START, _END = "<think>", "</think>"


class Reasoning:
    """Splits `<think>...</think>` off the front of an answer, chunk by chunk."""

    __slots__ = ("state", "buf", "_always", "_json")

    def __init__(self, parser: str, constrained: bool = False):
        # "open": is there a <think>? not known yet; "in": reasoning; "gap": after </think>; "out": content
        self.state = "open"
        self.buf = ""
        self._always = parser == "deepseek_r1"  # reasoning even without a <think> of its own
        self._json = constrained  # held to JSON: an answer that opens with JSON did not think

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) that can be sent now."""
        if self.state == "out":
            return "", text
        if self.state == "gap":  # the blank lines between the thinking and the answer are neither
            text = text.lstrip()
            if text:
                self.state = "out"
            return "", text
        buf = self.buf + text
        if self.state == "open":
            head = buf.lstrip()
            if head.startswith(_START):
                buf, self.state = head[len(_START):], "in"
            elif not final and _START.startswith(head):  # nothing yet, or the tag's first characters
                self.buf = buf
                return "", ""
            elif self._always and not (self._json and head[:1] in ("{", "[")):
                self.state = "in"
            else:
                self.state, self.buf = "out", ""
                return "", buf
        i = buf.find(_END)
        if i >= 0:
            self.state, self.buf = "gap", ""
            return buf[:i], self.feed(buf[i + len(_END):])[1]
        keep = 0 if final else held(buf, _END)
        self.buf = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], ""


@dataclass(slots=True)
class Part:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __add__(self, other: "Part") -> "Part":
        return Part(self.content + other.content, self.reasoning + other.reasoning,
                    self.tool_calls + other.tool_calls)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


class AnswerReader:
    __slots__ = ("reasoning", "tools", "include_reasoning", "ended")

    def __init__(self, reasoning: Reasoning | None, tools: ToolOutput | None, include_reasoning: bool = True):
        self.reasoning, self.tools, self.include_reasoning = reasoning, tools, include_reasoning
        self.ended = False

    @classmethod
    def make(cls, p: "Parsed", tool_parser: str | None, reasoning_parser: str | None) -> "AnswerReader | None":
        tools = ToolOutput.make(p.tool_choice, p.tool_name, tool_parser, p.parallel_tool_calls, p.stream, p.tools)
        constrained = p.tool_format is not None or is_json_format(p.response_format) or bool(p.structured_outputs)
        reasoning = Reasoning(reasoning_parser, constrained) if reasoning_parser and p.kind == "chat" else None
        if tools is None and reasoning is None:
            return None
        return cls(reasoning, tools, p.include_reasoning)

    def feed(self, text: str) -> Part:
        return self._part(*(self.reasoning.feed(text) if self.reasoning else ("", text)), final=False)

    def take(self, text: str, finish_reason: str | None) -> Part:
        """One engine chunk: what can be sent now, and what was held back if it is the last."""
        part = self.feed(text)
        return part + self.end() if finish_reason is not None else part

    def end(self) -> Part:
        """What was held back; once (a second call gives nothing)."""
        if self.ended:
            return Part()
        self.ended = True
        return self._part(*(self.reasoning.feed("", final=True) if self.reasoning else ("", "")), final=True)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return self.tools.finish_reason(engine_reason) if self.tools else engine_reason

    @property
    def tool_names(self) -> list[str]:
        """The functions called so far, in order."""
        return self.tools.names if self.tools else []

    def _part(self, reasoning: str, content: str, final: bool) -> Part:
        calls: list[dict[str, Any]] = []
        if self.tools is not None:
            content, calls = self.tools.feed(content)
            if final:
                more, last = self.tools.end()
                content, calls = content + more, calls + last
        return Part(content, reasoning if self.include_reasoning else "", calls)
