"""A reasoning model's thinking split from its answer (serving.ingress.answer), with tool calls after it."""

import json

from serving.ingress.answer import AnswerReader, Reasoning
from serving.ingress.openai_api import parse_chat
from serving.ingress.tools import ToolOutput, whole_calls

from test_tools import cut, splits


def read(reader, pieces, reason="stop"):
    parts = [reader.feed(p) for p in pieces] + [reader.end()]
    whole = parts[0]
    for p in parts[1:]:
        whole = whole + p
    return whole, reader.finish_reason(reason)


def test_think_tags_are_split_however_the_text_is_cut():
    text = "<think>\nweigh a < b and </thin k\n</think>\n\nThe answer."
    for parser in ("deepseek_r1", "qwen3"):
        for pieces in splits(text):
            part, _ = read(AnswerReader(Reasoning(parser), None), pieces)
            assert (part.reasoning, part.content) == ("\nweigh a < b and </thin k\n", "The answer.")


def test_without_tags_deepseek_thinks_and_qwen3_answers():
    # deepseek_r1's template opens <think> in the prompt: the model only closes it
    for pieces in splits("step one</think>done"):
        part, _ = read(AnswerReader(Reasoning("deepseek_r1"), None), pieces)
        assert (part.reasoning, part.content) == ("step one", "done")
    part, _ = read(AnswerReader(Reasoning("deepseek_r1"), None), ["cut off while thinking"], "length")
    assert (part.reasoning, part.content) == ("cut off while thinking", "")
    for pieces in splits("  <thin air, no thinking"):  # qwen3 with thinking off: all content
        part, _ = read(AnswerReader(Reasoning("qwen3"), None), pieces)
        assert (part.reasoning, part.content) == ("", "  <thin air, no thinking")


def test_tool_calls_are_read_from_the_content_after_the_thinking():
    call = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    text = f"<think>should I call <tool_call> f? yes</think>{call}"
    for pieces in splits(text):
        part, reason = read(AnswerReader(Reasoning("qwen3"), ToolOutput("hermes")), pieces)
        assert part.reasoning == "should I call <tool_call> f? yes" and part.content == ""
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in part.tool_calls] == [
            ("f", {"x": 1})]
        assert reason == "tool_calls"


def test_include_reasoning_false_leaves_it_out_and_completions_have_no_reader():
    p = parse_chat(json.dumps({"model": "m", "messages": [{"role": "user", "content": "q"}],
                               "include_reasoning": False}).encode())
    part, _ = read(AnswerReader.make(p, None, "qwen3"), ["<think>hmm</think>ok"])
    assert (part.reasoning, part.content) == ("", "ok")
    assert AnswerReader.make(p, None, None) is None  # no parser: the answer is content as it is


def test_earlier_thinking_reaches_the_template_as_reasoning_content():
    p = parse_chat(json.dumps({"model": "m", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "r"},
        {"role": "assistant", "content": "b", "reasoning_content": "s"}, {"role": "user", "content": "q2"}]}).encode())
    assert [m.get("reasoning_content") for m in p.messages] == [None, "r", "s", None]


def test_a_constrained_answer_is_split_only_if_its_engine_let_it_think_first():
    def parsed(**kw):
        return parse_chat(json.dumps({"model": "m", "messages": [{"role": "user", "content": "q"}],
                                      "tools": [{"type": "function", "function": {"name": "f"}}], **kw}).encode())
    named = parsed(tool_choice={"type": "function", "function": {"name": "f"}})
    as_json = parsed(tool_choice="none", response_format={"type": "json_object"})
    for parser in ("deepseek_r1", "qwen3"):
        for pieces in splits(' {"x": 1}'):  # vLLM without the reasoning parser: JSON from the first token
            part, _ = read(AnswerReader.make(named, None, parser), pieces)
            assert part.reasoning == "" and whole_calls(part.tool_calls)[0]["function"]["arguments"] == ' {"x": 1}'
            part, _ = read(AnswerReader.make(as_json, None, parser), pieces)
            assert (part.reasoning, part.content) == ("", ' {"x": 1}')
        # vLLM with it: structured outputs start after the thinking (R1's template opened the tag)
        text = ("" if parser == "deepseek_r1" else "<think>") + "x is 1</think>\n{\"x\": 1}"
        for pieces in splits(text):
            part, _ = read(AnswerReader.make(named, None, parser), pieces)
            assert part.reasoning == "x is 1" and whole_calls(part.tool_calls)[0]["function"]["arguments"] == '{"x": 1}'
            part, _ = read(AnswerReader.make(as_json, None, parser), pieces)
            assert (part.reasoning, part.content) == ("x is 1", '{"x": 1}')


from hypothesis import given, settings, strategies as st  # noqa: E402

_BITS = st.sampled_from(["<think>", "</think>", "<thi", "nk>", "</", " ", "\n", "x", "{", "a b"])


@settings(max_examples=300, deadline=None, derandomize=True)  # explored with 20,000 random ones
@given(bits=st.lists(_BITS, max_size=20), cuts=st.lists(st.integers(1, 5), max_size=30),
       parser=st.sampled_from(["deepseek_r1", "qwen3"]), constrained=st.booleans())
def test_any_answer_however_cut_loses_nothing_but_the_tags(bits, cuts, parser, constrained):
    text = "".join(bits)
    part, _ = read(AnswerReader(Reasoning(parser, constrained), None), cut(text, cuts))
    head = text.lstrip()
    start = head.startswith("<think>")
    body = head[len("<think>"):] if start else text
    thinks = start or (parser == "deepseek_r1" and not (constrained and head[:1] in "{["  and head))
    if not thinks:
        assert (part.reasoning, part.content) == ("", text)
    else:
        reasoning, _, content = body.partition("</think>")
        assert part.reasoning == reasoning and part.content == content.lstrip()
