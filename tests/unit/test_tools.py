"""Tool calls read out of an answer (serving.ingress.tools), whole and as it streams."""

import json

import pytest

from serving.errors import InvalidRequest
from serving.ingress.tools import ToolOutput, guided_format

CALL1 = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "unit": "c"}}\n</tool_call>'
CALL2 = '<tool_call>{"name": "search", "arguments": {"q": "a<b"}}</tool_call>'
TOOLS = ({"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "search"}})


def run(out: ToolOutput, pieces: list[str], reason: str = "stop"):
    """Feed the pieces, end; return (content, whole calls by index, finish_reason, deltas)."""
    content, deltas = [], []
    for p in pieces:
        c, d = out.feed(p)
        content.append(c)
        deltas += d
    c, d = out.end()
    content.append(c)
    deltas += d
    calls: dict[int, dict] = {}
    for d in deltas:  # as a client accumulates streamed deltas
        call = calls.setdefault(d["index"], {"id": None, "name": None, "arguments": ""})
        call["id"] = d.get("id", call["id"])
        call["name"] = d.get("function", {}).get("name", call["name"])
        call["arguments"] += d["function"].get("arguments", "")
    return "".join(content), [calls[i] for i in sorted(calls)], out.finish_reason(reason), deltas


def cut(text: str, sizes: list[int]) -> list[str]:
    """The text in pieces of these sizes, the rest as the last piece."""
    pieces, i = [], 0
    for n in sizes:
        pieces.append(text[i:i + n])
        i += n
    return pieces + [text[i:]]


def splits(text: str):
    """The text whole, then cut in two at every position, then one character at a time."""
    yield [text]
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    yield list(text)


def test_hermes_calls_come_out_whole_however_the_text_is_cut():
    text = "Let me check. " + CALL1 + "\n" + CALL2
    for pieces in splits(text):
        content, calls, reason, deltas = run(ToolOutput.make("auto", None, "hermes", None), pieces)
        assert content == "Let me check. "
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
            ("get_weather", {"city": "Lima", "unit": "c"}), ("search", {"q": "a<b"})]
        assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
        assert len(deltas) == 2  # each call is sent once, whole
        assert reason == "tool_calls"


def test_streamed_hermes_calls_send_the_name_then_the_arguments_as_they_come():
    text = "Let me check. " + CALL1 + "\n" + CALL2.replace('"a<b"', '"a}<b\\"]{"')
    for pieces in splits(text):
        content, calls, reason, deltas = run(ToolOutput.make("auto", None, "hermes", None, stream=True), pieces)
        assert content == "Let me check. " and reason == "tool_calls"
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
            ("get_weather", {"city": "Lima", "unit": "c"}), ("search", {"q": 'a}<b"]{'})]
        assert calls[0]["arguments"] == '{"city": "Lima", "unit": "c"}'  # the model's own text, no more
        headers = [d for d in deltas if "id" in d]
        assert [(d["index"], d["function"]["name"]) for d in headers] == [(0, "get_weather"), (1, "search")]
        if len(pieces) == len(text):  # one character at a time: the arguments leave as they are written
            assert len([d for d in deltas if d["index"] == 0 and "id" not in d]) == len(calls[0]["arguments"])


def test_a_streamed_hermes_call_cut_by_max_tokens_stays_a_call():
    out = ToolOutput("hermes", stream=True)
    content, calls, reason, _ = run(out, ['<tool_call>{"name": "search", "arguments": {"q": "ab'], "length")
    assert (content, reason) == ("", "length")
    assert [(c["name"], c["arguments"]) for c in calls] == [("search", '{"q": "ab')]  # as far as it got


@pytest.mark.parametrize("call", [
    '<tool_call>{"arguments": {"q": "x"}, "name": "search"}</tool_call>',  # the name last
    '<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}</tool_call>',  # arguments as a string
])
def test_streamed_hermes_calls_of_another_shape_are_sent_whole(call):
    for pieces in splits(call):
        _, calls, _, deltas = run(ToolOutput("hermes", stream=True), pieces)
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("search", {"q": "x"})]
        assert len(deltas) == 1


def test_streamed_hermes_keeps_the_order_and_parallel_false():
    whole = '<tool_call>{"arguments": {}, "name": "search"}</tool_call>'
    _, calls, _, _ = run(ToolOutput("hermes", stream=True), [whole + CALL1])  # one chunk: whole, then streamed
    assert [c["name"] for c in calls] == ["search", "get_weather"]
    for pieces in splits(CALL1 + CALL2):
        _, calls, _, _ = run(ToolOutput("hermes", parallel=False, stream=True), pieces)
        assert [c["name"] for c in calls] == ["get_weather"]


def test_hermes_text_without_calls_is_content_untouched():
    text = "if a < b then <tool or <tool_c, done"
    for pieces in splits(text):
        content, calls, reason, _ = run(ToolOutput.make("auto", None, "hermes", None), pieces, "length")
        assert (content, calls, reason) == (text, [], "length")


def test_hermes_call_that_does_not_parse_is_returned_as_text():
    bad = "<tool_call>{not json}</tool_call> after"
    content, calls, reason, _ = run(ToolOutput("hermes"), [bad])
    assert (content, calls, reason) == (bad, [], "stop")


def test_hermes_call_cut_by_max_tokens():
    # unclosed but complete JSON (the closing tag cut off) is still a call, as vLLM's parser reads it
    _, calls, _, _ = run(ToolOutput("hermes"), ['<tool_call>{"name": "search", "arguments": {}}'], "length")
    assert [(c["name"], c["arguments"]) for c in calls] == [("search", "{}")]
    content, calls, reason, _ = run(ToolOutput("hermes"), ['ok <tool_call>{"name": "sea'], "length")
    assert (content, calls, reason) == ('ok <tool_call>{"name": "sea', [], "length")


def test_parallel_tool_calls_false_keeps_the_first_call():
    _, calls, _, _ = run(ToolOutput("hermes", parallel=False), [CALL1 + CALL2])
    assert [c["name"] for c in calls] == ["get_weather"]


def test_a_named_function_streams_its_arguments():
    out = ToolOutput.make("function", "get_weather", None, None)
    content, calls, reason, deltas = run(out, ['{"ci', 'ty": ', '"Lima"}'])
    assert content == "" and reason == "stop"  # OpenAI's finish_reason for a named call
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", '{"city": "Lima"}')]
    assert deltas[0]["type"] == "function" and "id" not in deltas[1]  # the header once, then arguments
    _, calls, _, _ = run(ToolOutput("function", "search"), [])  # even an empty answer is the call
    assert [(c["name"], c["arguments"]) for c in calls] == [("search", "")]


def test_required_reads_the_constrained_array_item_by_item():
    text = ' [ {"name": "get_weather", "parameters": {"city": "Li}ma"}} ,\n{"name": "search", "parameters": {}} ] '
    for pieces in splits(text):
        content, calls, reason, _ = run(ToolOutput.make("required", None, None, None), pieces)
        assert content == "" and reason == "tool_calls"
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
            ("get_weather", {"city": "Li}ma"}), ("search", {})]
    out = ToolOutput("required")
    first = out.feed('[{"name": "search", "parameters": {}}, {"na')[1]
    assert [c["function"]["name"] for c in first] == ["search"]  # sent before the answer ends
    content, calls, reason, _ = run(ToolOutput("required"), ['[{"name": "sea'], "length")  # cut short
    assert (content, calls, reason) == ('[{"name": "sea', [], "length")
    content, calls, _, _ = run(ToolOutput("required"), ['[{"name": "search", "parameters": {}}, {"na'], "length")
    assert (content, [c["name"] for c in calls]) == ('{"na', ["search"])
    for pieces in splits(" ba zo"):  # not an array (a simulated engine's words): content as it comes
        assert run(ToolOutput("required"), pieces)[:3] == (" ba zo", [], "stop")


def test_no_reader_without_tools_or_parser():
    assert ToolOutput.make("none", None, "hermes", None) is None
    assert ToolOutput.make("auto", None, None, None) is None  # no parser configured: content


def test_guided_formats():
    named = guided_format(TOOLS, "function", "get_weather", None)
    assert named["json_schema"]["schema"] == TOOLS[0]["function"]["parameters"]
    assert guided_format(TOOLS, "function", "search", None)["json_schema"]["schema"] == {
        "type": "object", "properties": {}}
    assert guided_format(TOOLS, "auto", None, None) is None and guided_format(TOOLS, "none", None, None) is None
    req = guided_format(TOOLS, "required", None, False)["json_schema"]["schema"]
    assert req["type"] == "array" and req["minItems"] == 1 and req["maxItems"] == 1
    assert [s["properties"]["name"]["enum"] for s in req["items"]["anyOf"]] == [["get_weather"], ["search"]]


def test_required_hoists_defs_and_refuses_conflicting_ones():
    def tool(name, defs):
        return {"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {"x": {"$ref": "#/$defs/X"}}, "$defs": defs}}}
    schema = guided_format((tool("a", {"X": {"type": "string"}}), tool("b", {"X": {"type": "string"}})),
                           "required", None, None)["json_schema"]["schema"]
    assert schema["$defs"] == {"X": {"type": "string"}}
    assert all("$defs" not in s["properties"]["parameters"] for s in schema["items"]["anyOf"])
    with pytest.raises(InvalidRequest) as e:
        guided_format((tool("a", {"X": {"type": "string"}}), tool("b", {"X": {"type": "integer"}})),
                      "required", None, None)
    assert e.value.param == "tools"


@pytest.mark.parametrize("stream", [False, True])
def test_llama3_json_calls_and_plain_answers(stream):
    text = ' {"name": "get_weather", "parameters": {"city": "Lima"}}; {"name": "search", "parameters": {}}'
    for lead in ("", "<|python_tag|>"):
        for pieces in splits(lead + text):
            content, calls, reason, deltas = run(ToolOutput.make("auto", None, "llama3_json", None, stream), pieces)
            assert (content, reason) == ("", "tool_calls")
            assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
                ("get_weather", {"city": "Lima"}), ("search", {})]
            if stream and len(pieces) > 2:  # one character at a time: the parameters as they are written
                assert len([d for d in deltas if d["index"] == 0 and "id" not in d]) == len('{"city": "Lima"}')
    plain = "  It is sunny in {city}."  # does not open with a call: content, streamed as it comes
    for pieces in splits(plain):
        assert run(ToolOutput("llama3_json", stream=stream), pieces)[:3] == (plain, [], "stop")
    out = ToolOutput("llama3_json", stream=stream)
    assert out.feed("  ") == ("", []) and out.feed("Sun") == ("  Sun", [])  # decided at the first word
    cut = '{"name": "search", "parameters": {"q'
    content, calls, reason, _ = run(ToolOutput("llama3_json", stream=stream), [cut], "length")
    if stream:  # a call once sent stays one, its parameters as far as they got
        assert (content, [(c["name"], c["arguments"]) for c in calls], reason) == ("", [("search", '{"q')], "length")
    else:  # read whole: the text, as it was
        assert (content, calls, reason) == (cut, [], "length")


def test_streamed_llama3_json_calls_of_another_shape_and_text_after_them():
    text = '{"parameters": {"q": "x"}, "name": "search"}; {"name": "get_weather", "parameters": {"city": "Oslo"}} bye'
    for pieces in splits(text):
        content, calls, _, _ = run(ToolOutput("llama3_json", stream=True), pieces)
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
            ("search", {"q": "x"}), ("get_weather", {"city": "Oslo"})]
        assert content == "bye"  # never dropped
    out = ToolOutput("llama3_json", parallel=False, stream=True)
    _, calls, _, _ = run(out, [text[i:i + 3] for i in range(0, 99, 3)])
    assert [c["name"] for c in calls] == ["search"]




from hypothesis import given, settings, strategies as st  # noqa: E402

_BITS = st.sampled_from(["<tool_call>", "</tool_call>", "<|python_tag|>", '{"name": "f", ', '"arguments": ',
                         '"parameters": ', "{", "}", "[", "]", '"', "\\", ";", " ", "x", '"a": 1', ",", "\n",
                         "<function=f>", "</function>", "<parameter=a>", "</parameter>", "<parameter=",
                         "f(", "a=1", ")", "'", "<|python_start|>", "<|python_end|>"])


@settings(max_examples=300, deadline=None, derandomize=True)  # explored with 20,000 random ones
@given(bits=st.lists(_BITS, max_size=30), cuts=st.lists(st.integers(1, 6), max_size=40),
       mode=st.sampled_from(["hermes", "llama3_json", "qwen3_coder", "pythonic", "required", "function"]),
       stream=st.booleans(),
       parallel=st.sampled_from([None, False]))
def test_any_answer_however_cut_is_read_without_raising(bits, cuts, mode, stream, parallel):
    text = "".join(bits)
    content, calls, _, _ = run(ToolOutput(mode, "f", parallel, stream), cut(text, cuts))
    if not calls:  # no call read: nothing is lost, the answer is its content
        assert content == text or mode == "function"
    assert parallel is not False or len(calls) <= 1


CODER_TOOLS = ({"type": "function", "function": {"name": "write_file", "parameters": {"type": "object", "properties": {
    "path": {"type": "string"}, "content": {"type": "string"}, "mode": {"type": "integer"},
    "ratio": {"type": "number"}, "force": {"type": "boolean"}, "tags": {"type": "array"}}}}},
    {"type": "function", "function": {"name": "search"}})
CODER = ("Writing it. <tool_call>\n<function=write_file>\n<parameter=path>\na.py\n</parameter>\n"
         "<parameter=content>\ndef f():\n    return '<x>'\n</parameter>\n<parameter=mode>\n420\n</parameter>\n"
         "<parameter=ratio>\n2.0\n</parameter>\n<parameter=force>\nTrue\n</parameter>\n"
         "<parameter=tags>\n[\"a\", 1]\n</parameter>\n<parameter=other>\n7\n</parameter>\n</function>\n</tool_call>\n"
         "<tool_call>\n<function=search>\n</function>\n</tool_call>")
CODER_ARGS = [{"path": "a.py", "content": "def f():\n    return '<x>'", "mode": 420, "ratio": 2, "force": True,
               "tags": ["a", 1], "other": "7"}, {}]


@pytest.mark.parametrize("stream", [False, True])
def test_qwen3_coder_calls_typed_by_their_schemas_however_the_text_is_cut(stream):
    for pieces in splits(CODER):
        out = ToolOutput.make("auto", None, "qwen3_coder", None, stream, CODER_TOOLS)
        content, calls, reason, deltas = run(out, pieces)
        assert (content, reason) == ("Writing it. ", "tool_calls")
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == list(zip(["write_file", "search"],
                                                                                     CODER_ARGS))
        if stream:  # the name first, then each parameter as it is whole
            first = [d["function"] for d in deltas if d["index"] == 0]
            assert first[0]["name"] == "write_file" and first[1]["arguments"] == '{"path": "a.py"'
            assert len(first) == 1 + 7 + 1  # header, seven parameters, the closing brace
        else:
            assert len(deltas) == 2


def test_qwen3_coder_cut_short_and_text_that_is_no_call():
    cut = "<tool_call>\n<function=write_file>\n<parameter=path>\na.py\n</parameter>\n<parameter=content>\nx = "
    for stream in (False, True):  # a parameter cut short runs to the end, as vLLM's parser reads it
        content, calls, reason, _ = run(ToolOutput("qwen3_coder", stream=stream, tools=CODER_TOOLS), [cut], "length")
        assert (content, reason) == ("", "length")
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
            ("write_file", {"path": "a.py", "content": "x = "})]
    bad = "<tool_call>not a function</tool_call> ok"
    assert run(ToolOutput("qwen3_coder", stream=True), [bad])[:3] == (bad, [], "stop")
    _, calls, _, _ = run(ToolOutput("qwen3_coder", parallel=False, stream=True, tools=CODER_TOOLS), [CODER])
    assert [c["name"] for c in calls] == ["write_file"]


PYTHONIC = ('[get_weather(city="San Francisco", metric=True, days=[1, 2]), '
            "search(q='a)b, c(', filters={'lang': None})]")
PYTHONIC_CALLS = [("get_weather", {"city": "San Francisco", "metric": True, "days": [1, 2]}),
                  ("search", {"q": "a)b, c(", "filters": {"lang": None}})]


@pytest.mark.parametrize("wrapped", [False, True], ids=["llama3.2", "llama4-tags"])
@pytest.mark.parametrize("stream", [False, True])
def test_pythonic_calls_however_the_text_is_cut(stream, wrapped):
    text = f"<|python_start|>{PYTHONIC}<|python_end|>" if wrapped else PYTHONIC
    for pieces in splits(text):
        content, calls, reason, deltas = run(ToolOutput("pythonic", stream=stream), pieces)
        assert content == "" and reason == "tool_calls", pieces
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == PYTHONIC_CALLS
        assert all(c["id"].startswith("call_") for c in calls)
        assert len(deltas) == 2  # each call whole, once its ")" closes it


@pytest.mark.parametrize("text,stream,content,names", [
    ("The weather is fine.", True, "The weather is fine.", []),
    ("[1, 2, 3]", False, "[1, 2, 3]", []),  # a list that is no calls
    ("[f(1)]", True, "[f(1)]", []),  # positional arguments: not vLLM's form
    ("[f(a=1), g(b=", False, "[f(a=1), g(b=", []),  # cut by max_tokens, not streamed: all text
    ("[f(a=1), g(b=", True, "g(b=", ["f"]),  # streamed: the whole call left, the rest is text
    ("[f(a=1)] and then words", False, "[f(a=1)] and then words", []),
    ("[f(a=1)] and then words", True, " and then words", ["f"]),
    ("[f(a=1), plain words]", True, "plain words]", ["f"]),
    ("[f(a=1e999)]", True, "[f(a=1e999)]", []),  # infinity is no JSON value
    ("[f(a=x)]", True, "[f(a=x)]", []),  # a name is no value
    ("[f(a=g(1))]", False, "[f(a=g(1))]", []),  # nor is a call: it is parsed, never run
])
def test_pythonic_text_that_is_no_call_is_content(text, stream, content, names):
    got, calls, _, _ = run(ToolOutput("pythonic", stream=stream), [text])
    assert (got, [c["name"] for c in calls]) == (content, names)


def test_pythonic_values_as_vllm_reads_them():
    """JSON's true/false/null (small Llama 3.2 models write them), signed numbers, sets and tuples
    as arrays, placeholder-free f-strings, dotted names."""
    text = "[tools.f(a=true, b=null, c=-2.5, d={1}, e=(1, 'x'), g=f'hi', h=+3, i=False)]"
    _, calls, _, _ = run(ToolOutput("pythonic", stream=True), list(text))
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("tools.f", {"a": True, "b": None, "c": -2.5, "d": [1], "e": [1, "x"], "g": "hi", "h": 3, "i": False})]


@pytest.mark.parametrize("stream", [False, True])
def test_pythonic_escapes_cut_anywhere(stream):
    """Found by a review: a chunk that ended on a backslash in a string flipped the quote state."""
    text = "[send(msg='it\\'s done'), write(path='C:\\\\', n=1)]"
    for pieces in splits(text):
        content, calls, _, _ = run(ToolOutput("pythonic", stream=stream), pieces)
        assert content == "" and [json.loads(c["arguments"]) for c in calls] == [
            {"msg": "it's done"}, {"path": "C:\\", "n": 1}], pieces


@settings(max_examples=300, deadline=None, derandomize=True)  # explored with 20,000 random ones
@given(bits=st.lists(st.one_of(_BITS, st.sampled_from(["\\", "true", "-", "f'", "x.", "=", "f(a='x')", "g(b=1)"])),
                     max_size=30), cuts=st.lists(st.integers(1, 6), max_size=40), stream=st.booleans())
def test_a_pythonic_answer_reads_the_same_however_it_is_cut(bits, cuts, stream):
    text = "".join(bits)
    got = run(ToolOutput("pythonic", stream=stream), cut(text, cuts))
    whole = run(ToolOutput("pythonic", stream=stream), [text])
    assert (got[0], [(c["name"], c["arguments"]) for c in got[1]]) == \
        (whole[0], [(c["name"], c["arguments"]) for c in whole[1]])
