"""What a simulated engine writes under structured outputs: JSON that holds the schema.

    json_pieces(response_format, seed) -> list of token texts, or None (free text)
    shaped_pieces(request, seed)        -> the same for a request's response_format or
                                           vLLM structured_outputs (json, json_object, choice)

A real engine constrained by vLLM's structured outputs writes a value of the
requested shape; so does a simulated one, drawn from `seed`: `json_object` an
object of a few word keys, `json_schema` a value of the schema (type, enum,
const, properties and required, items with minItems/maxItems, anyOf/oneOf/allOf,
$ref into $defs or definitions, string formats date, date-time, email and
uuid, numeric bounds, string lengths). `pattern` and `multipleOf` are not
honoured, nor minItems and minLength above 64 items and 2,048 characters (the
answer is cut by max_tokens well before). A schema vLLM would refuse gets `{}`.
Optional properties are written about half of the time. The JSON is
cut into word and punctuation pieces, one simulated token each, so an answer
longer than max_tokens ends cut, as a real one does. Of vLLM's own
`structured_outputs`, `json` and `json_object` are written the same way and
`choice` as one of the choices; `regex` and `grammar` are not honoured (words).
"""

from __future__ import annotations

import json
import math
import random
import re
from typing import Any

from serving.engines.tokenizer import WORDS

_MAX_DEPTH = 6  # deeper than this, only what the schema requires (recursive $refs end)
_GIVE_UP = 24  # a schema that requires itself: a word at this depth
_MAX_ITEMS, _MAX_CHARS = 64, 2048  # bounds on minItems and minLength (the answer is cut by max_tokens anyway)
_PIECE = re.compile(r"\s*\w+|\s*[^\w\s]+|\s+")
_FORMATS = {"date": "2026-11-29", "date-time": "2026-11-29T12:00:00Z", "time": "12:00:00",
            "email": "agent@example.com", "uri": "https://example.com/"}


def json_pieces(response_format: dict[str, Any] | None, seed: int) -> list[str] | None:
    kind = (response_format or {}).get("type")
    if kind not in ("json_object", "json_schema"):
        return None
    rng = random.Random(seed)
    if kind == "json_object":
        return _PIECE.findall(json.dumps({_word(rng): _words(rng, 1, 4) for _ in range(rng.randint(1, 3))}))
    schema = (response_format.get("json_schema") or {}).get("schema") or {}  # type: ignore[union-attr]
    try:
        text = json.dumps(_Sampler(schema, rng).value(schema, 0), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, AttributeError, LookupError, OverflowError):  # one vLLM would refuse
        text = "{}"
    return _PIECE.findall(text)


def shaped_pieces(request: Any, seed: int) -> list[str] | None:
    """What a simulated engine writes for `request` (a GenerateRequest) under structured outputs;
    None: free text."""
    so = request.structured_outputs or {}
    if "choice" in so:
        return _PIECE.findall(str(random.Random(seed).choice(so["choice"])))
    if "json" in so:
        schema = so["json"]
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError:
                schema = {}
        return json_pieces({"type": "json_schema", "json_schema": {"schema": schema}}, seed)
    if so.get("json_object"):
        return json_pieces({"type": "json_object"}, seed)
    return json_pieces(request.response_format, seed)


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(_word(rng) for _ in range(rng.randint(lo, hi)))


class _Sampler:
    def __init__(self, root: dict[str, Any], rng: random.Random):
        self.root, self.rng = root, rng

    def value(self, s: Any, depth: int) -> Any:
        if not isinstance(s, dict) or depth > _GIVE_UP:  # `true`, or a schema that requires itself
            return _word(self.rng)
        s = self._resolve(s, depth)
        if "const" in s:
            return s["const"]
        if isinstance(s.get("enum"), list) and s["enum"]:
            return self.rng.choice(s["enum"])
        kind = s.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"] or ["null"]
            kind = self.rng.choice(kinds)
        if kind is None:
            kind = "object" if "properties" in s else "array" if "items" in s else "string"
        return self._KINDS.get(kind, _Sampler._string)(self, s, depth)

    def _resolve(self, s: dict[str, Any], depth: int) -> dict[str, Any]:
        """The schema with $ref, allOf and one branch of anyOf/oneOf merged in."""
        for _ in range(32):
            ref = s.get("$ref")
            if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
                target: Any = self.root
                for part in ref[2:].split("/") if ref != "#" else ():
                    target = target.get(part, {}) if isinstance(target, dict) else {}
                s = {**{k: v for k, v in s.items() if k != "$ref"}, **(target if isinstance(target, dict) else {})}
                continue
            branches = s.get("anyOf") or s.get("oneOf")
            if isinstance(branches, list) and branches:
                pick = branches[0] if depth >= _MAX_DEPTH else self.rng.choice(branches)
                s = {**{k: v for k, v in s.items() if k not in ("anyOf", "oneOf")},
                     **(pick if isinstance(pick, dict) else {})}
                continue
            parts = s.get("allOf")
            if isinstance(parts, list) and parts:
                merged = {k: v for k, v in s.items() if k != "allOf"}
                props, required = dict(s.get("properties") or {}), list(s.get("required") or ())
                for part in parts:
                    if isinstance(part, dict):
                        merged.update(part)
                        props.update(part.get("properties") or {})
                        required += part.get("required") or ()
                s = {**merged, "properties": props, "required": required} if props or required else merged
                continue
            return s
        return s

    def _object(self, s: dict[str, Any], depth: int) -> dict[str, Any]:
        props = s.get("properties") or {}
        required = set(s.get("required") or ())
        out = {}
        for name, sub in props.items():
            if name in required or (depth < _MAX_DEPTH and self.rng.random() < 0.5):
                out[name] = self.value(sub, depth + 1)
        for name in required - out.keys():  # required, not described: any value
            out[name] = _word(self.rng)
        return out

    def _array(self, s: dict[str, Any], depth: int) -> list[Any]:
        lo = min(int(s.get("minItems") or 0), _MAX_ITEMS)
        hi = int(s.get("maxItems", max(lo, 3)))
        n = lo if depth >= _MAX_DEPTH else self.rng.randint(min(max(lo, 1), hi), max(min(3, hi), lo))
        return [self.value(s.get("items", {}), depth + 1) for _ in range(n)]

    def _string(self, s: dict[str, Any], depth: int) -> str:
        fmt = s.get("format")
        if fmt == "uuid":
            return "%08x-%04x-4%03x-8%03x-%012x" % tuple(self.rng.getrandbits(b) for b in (32, 16, 12, 12, 48))
        text = _FORMATS.get(fmt) or _words(self.rng, 1, 3)
        lo, hi = min(int(s.get("minLength") or 0), _MAX_CHARS), s.get("maxLength")
        while len(text) < lo:
            text += " " + _word(self.rng)
        return text if hi is None else text[:int(hi)]

    def _integer(self, s: dict[str, Any], depth: int) -> int:
        lo, hi = self._bounds(s, 1)
        return self.rng.randint(math.ceil(lo), max(math.ceil(lo), math.floor(hi)))

    def _number(self, s: dict[str, Any], depth: int) -> float:
        lo, hi = self._bounds(s, 0.01)
        return min(max(round(self.rng.uniform(lo, hi), 2), lo), hi)

    @staticmethod
    def _bounds(s: dict[str, Any], step: float) -> tuple[float, float]:
        lo = s.get("minimum", s["exclusiveMinimum"] + step if "exclusiveMinimum" in s else None)
        hi = s.get("maximum", s["exclusiveMaximum"] - step if "exclusiveMaximum" in s else None)
        lo = (0 if hi is None or hi >= 0 else hi - 100) if lo is None else lo
        hi = lo + 100 if hi is None else hi
        return lo, max(lo, hi)

    def _boolean(self, s: dict[str, Any], depth: int) -> bool:
        return self.rng.random() < 0.5

    def _null(self, s: dict[str, Any], depth: int) -> None:
        return None

    _KINDS = {"object": _object, "array": _array, "string": _string, "integer": _integer,
              "number": _number, "boolean": _boolean, "null": _null}
