"""Request validation (every bad input -> 400 naming the field), rendering, response objects, SSE bytes."""

import json

import pytest

from serving.errors import InvalidRequest
from serving.ingress import sse
from serving.ingress.openai_api import Responder, parse_chat, parse_completion, usage


def body(**kw) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}).encode()


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

BAD_CHAT = [
    ("malformed-json", b'{"model": "m",', None, "could not parse the JSON body"),
    ("not-utf8", b'\xff\xfe{', None, "is not UTF-8 text"),
    ("array-body", b"[1, 2]", None, "must be a JSON object"),
    ("no-model", json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "model", "Field required"),
    ("empty-model", body(model=""), "model", "at least 1 character"),
    ("model-not-string", body(model=3), "model", "valid string"),
    ("messages-missing", json.dumps({"model": "m"}).encode(), "messages", "Field required"),
    ("messages-empty", body(messages=[]), "messages", "at least one message"),
    ("messages-string", body(messages="hi"), "messages", "valid list"),
    ("role-unknown", body(messages=[{"role": "robot", "content": "x"}]), "messages.0.role", "Input should be"),
    ("content-number", body(messages=[{"role": "user", "content": 5}]), "messages.0.content", "valid string"),
    ("so-two-kinds", body(structured_outputs={"choice": ["a"], "regex": "a+"}), "structured_outputs",
     "only one kind of constraint"),
    ("so-empty-choice", body(structured_outputs={"choice": []}), "structured_outputs.choice", "at least 1"),
    ("so-structural-tag", body(structured_outputs={"structural_tag": "x"}), "structured_outputs", "not supported"),
    ("so-and-json-format", body(structured_outputs={"choice": ["a"]}, response_format={"type": "json_object"}),
     "structured_outputs", "cannot be used together"),
    ("so-and-forced-call", body(tools=[TOOL], tool_choice="required", structured_outputs={"regex": "a"}),
     "structured_outputs", "cannot be used together"),
    ("content-image", body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages.0.content", "parts of type `image_url` are not supported"),
    ("max-tokens-zero", body(max_tokens=0), "max_tokens", "greater than or equal to 1"),
    ("max-tokens-negative", body(max_tokens=-1), "max_tokens", "greater than or equal to 1"),
    ("max-tokens-text", body(max_tokens="ten"), "max_tokens", "valid integer"),
    ("max-completion-tokens-zero", body(max_completion_tokens=0), "max_completion_tokens", "greater than"),
    ("temperature-high", body(temperature=3), "temperature", "less than or equal to 2"),
    ("top-p-zero", body(top_p=0), "top_p", "greater than 0"),
    ("n-too-many", body(n=129), "n", "less than or equal to 128"),
    ("n-zero", body(n=0), "n", "greater than or equal to 1"),
    ("seed-over-64-bits", body(seed=2**63), "seed", "less than or equal to"),
    ("stream-not-bool", body(stream="yes please"), "stream", "valid boolean"),
    ("stream-options-type", body(stream=True, stream_options={"include_usage": "x"}),
     "stream_options.include_usage", "valid boolean"),
    ("top-logprobs-alone", body(top_logprobs=2), "top_logprobs", "needs `logprobs`"),
    ("top-logprobs-high", body(top_logprobs=21), "top_logprobs", "less than or equal to 20"),
    ("presence-penalty-high", body(presence_penalty=2.5), "presence_penalty", "less than or equal to 2"),
    ("frequency-penalty-text", body(frequency_penalty="lots"), "frequency_penalty", "valid number"),
    ("repetition-penalty-zero", body(repetition_penalty=0), "repetition_penalty", "greater than 0"),
    ("top-k-below-minus-one", body(top_k=-2), "top_k", "greater than or equal to -1"),
    ("min-p-over-one", body(min_p=1.5), "min_p", "less than or equal to 1"),
    ("min-tokens-negative", body(min_tokens=-1), "min_tokens", "greater than or equal to 0"),
    ("stop-token-id-negative", body(stop_token_ids=[-3]), "stop_token_ids.0", "greater than or equal to 0"),
    ("response-format-type", body(response_format={"type": "xml"}), "response_format.type", "Input should be"),
    ("response-format-no-schema", body(response_format={"type": "json_schema"}), "response_format",
     "json_schema` is required"),
    ("response-format-schema-missing", body(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format.json_schema.schema", "Field required"),
    ("logit-bias-word", body(logit_bias={"hello": 1}), "logit_bias", "keys must be token ids"),
    ("logit-bias-range", body(logit_bias={"5": 101}), "logit_bias.5", "less than or equal to 100"),
    ("tools-empty", body(tools=[]), "tools", "at least 1 item"),
    ("tool-type", body(tools=[{"type": "web", "function": {"name": "f"}}]), "tools.0.type", "Input should be"),
    ("tool-name", body(tools=[{"type": "function", "function": {"name": "no spaces"}}]),
     "tools.0.function.name", "should match pattern"),
    ("tool-choice-no-tools", body(tool_choice="required"), "tool_choice", "`tools` must be set"),
    ("tool-choice-word", body(tools=[TOOL], tool_choice="always"), "tool_choice", "Input should be"),
    ("tool-choice-unknown-name", body(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}),
     "tool_choice.function.name", "not one of the `tools`"),
    ("tool-choice-and-json", body(tools=[TOOL], tool_choice="required", response_format={"type": "json_object"}),
     "response_format", "cannot be used together"),
    ("continue-and-generation-prompt", body(continue_final_message=True), "continue_final_message",
     "Cannot set both"),
    ("continue-after-user", body(continue_final_message=True, add_generation_prompt=False),
     "continue_final_message", "assistant message last"),
    ("template-kwargs-reserved", body(chat_template_kwargs={"tokenize": True, "chat_template": "x"}),
     "chat_template_kwargs", "may not set ['chat_template', 'tokenize']"),
    ("template-kwargs-list", body(chat_template_kwargs=[1]), "chat_template_kwargs", "valid dictionary"),
    ("tool-call-arguments", body(messages=[{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": 3}}]}]),
     "messages.0.tool_calls.0.function.arguments", "valid string"),
]


@pytest.mark.parametrize("args,want", [
    ('{"city": "Pa', {}),  # cut by max_tokens, as the gateway itself returns such a call
    ("", {}), (None, {}), ("[1]", {}), ("42", {}),
    ('{"city": "Paris"}', {"city": "Paris"}), ({"city": "Paris"}, {"city": "Paris"}),
], ids=["cut", "empty", "null", "array", "number", "json", "object"])
def test_earlier_tool_call_arguments_that_are_no_json_object_reach_the_template_as_empty(args, want, caplog):
    """vLLM's rule: failing the request would fail every later turn of the conversation too."""
    call = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": args}}
    p = parse_chat(body(messages=[{"role": "user", "content": "weather?"},
                                  {"role": "assistant", "content": None, "tool_calls": [call]},
                                  {"role": "tool", "tool_call_id": "c", "content": "sunny"}]))
    assert p.messages[1]["tool_calls"][0]["function"]["arguments"] == want
    assert json.dumps(want) in p.prompt
    warned = [r for r in caplog.records if "not JSON" in r.message]
    assert len(warned) == (args == '{"city": "Pa') and "Pa" not in caplog.text  # once, and no content logged


@pytest.mark.parametrize("raw,param,fragment", [c[1:] for c in BAD_CHAT], ids=[c[0] for c in BAD_CHAT])
def test_bad_chat_input_is_400_naming_the_field(raw, param, fragment):
    with pytest.raises(InvalidRequest) as e:
        parse_chat(raw)
    assert e.value.status == 400
    assert e.value.param == param
    assert fragment in e.value.message
    assert e.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("key,value,kind", [
    ("prompt_logprobs", 1, "completion"), ("return_token_offsets", True, "chat"), ("truncate_prompt_tokens", 8, "chat"),
    ("use_beam_search", True, "completion"), ("cache_salt", "mine", "chat"), ("echo", True, "chat"),
    ("add_special_tokens", True, "chat"), ("add_special_tokens", False, "completion"),
    ("chat_template", "{{ x }}", "chat"), ("kv_transfer_params", {"do_remote_prefill": True}, "completion"),
    ("use_beam_search", 0, "chat"), ("priority", False, "completion"),  # not the bools / ints that mean "unused"
])
def test_vllm_options_the_gateway_does_not_serve_are_refused_not_dropped(key, value, kind):
    """Found by a review: vLLM's options were ignored (a 200 with wrong or missing data)."""
    raw = body(**{key: value}) if kind == "chat" else {"model": "m", "prompt": "a", key: value}
    with pytest.raises(InvalidRequest) as e:
        (parse_chat if kind == "chat" else parse_completion)(raw)
    assert (e.value.status, e.value.param) == (400, key) and "not supported" in e.value.message
    # set to what means "not used", they pass, as a client library's defaults do
    unset = {"prompt_logprobs": None, "return_token_offsets": False, "truncate_prompt_tokens": None,
             "use_beam_search": False, "cache_salt": None, "echo": False, "chat_template": None,
             "kv_transfer_params": None, "priority": 0}.get(key, kind == "completion")
    (parse_chat if kind == "chat" else parse_completion)(
        body(**{key: unset}) if kind == "chat" else {"model": "m", "prompt": "a", key: unset})


def test_vllm_sampling_extensions_reach_the_engine_as_set():
    p = parse_chat(body(include_stop_str_in_output=True, skip_special_tokens=False, allowed_token_ids=[3, 4],
                        bad_words=["no"], spaces_between_special_tokens=False))
    assert dict(p.sampling) == {"include_stop_str_in_output": True, "skip_special_tokens": False,
                                "allowed_token_ids": [3, 4], "bad_words": ["no"],
                                "spaces_between_special_tokens": False}
    assert parse_chat(body()).sampling == ()  # nothing set: the engine's defaults
    assert parse_completion({"model": "m", "prompt": "a", "echo": True}).echo  # completions' own echo


BAD_COMPLETION = [
    ("prompt-empty", {"prompt": ""}, "prompt"),
    ("prompt-empty-list", {"prompt": []}, "prompt"),
    ("prompt-object", {"prompt": {"a": 1}}, "prompt"),
    ("two-prompts", {"prompt": ["a", "b"]}, "prompt"),
    ("suffix", {"prompt": "def f(", "suffix": "return x"}, "suffix"),
    ("logprobs-21", {"prompt": "a", "logprobs": 21}, "logprobs"),  # vLLM's max_logprobs: 20
    ("max-tokens-zero", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("token-id-negative", {"prompt": [5, -1]}, "prompt"),  # found by the fuzz drill: was a 500
    ("token-id-over-32-bit", {"prompt": [2**32]}, "prompt"),
]


@pytest.mark.parametrize("extra,param", [c[1:] for c in BAD_COMPLETION], ids=[c[0] for c in BAD_COMPLETION])
def test_bad_completion_input_is_400(extra, param):
    with pytest.raises(InvalidRequest) as e:
        parse_completion(json.dumps({"model": "m", **extra}).encode())
    assert e.value.param == param


def test_chat_parse_renders_messages_in_order_and_reads_options():
    p = parse_chat(json.dumps({
        "model": "m", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 7,
        "temperature": 0, "seed": 3, "stop": "END", "some_future_field": 1,
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    }).encode())
    assert p.prompt == "<|system|> be brief <|user|> a b <|assistant|>"
    refused = [{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
               {"role": "user", "content": "x"}]
    assert parse_chat(body(messages=refused)).prompt == "<|assistant|> no <|user|> x <|assistant|>"  # as OpenAI sent it
    assert (p.kind, p.max_tokens, p.stream, p.include_usage, p.temperature, p.seed, p.stop) == \
           ("chat", 7, True, True, 0.0, 3, ("END",))
    assert parse_chat(body()).max_tokens is None  # the model's default applies later
    assert (parse_chat(body()).temperature, parse_chat(body()).top_p) == (None, None)  # so does its sampling
    assert parse_chat(body(max_tokens=9, max_completion_tokens=4)).max_tokens == 4
    cont = parse_chat(body(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                           continue_final_message=True, add_generation_prompt=False))
    assert cont.prompt == "<|user|> a <|assistant|> b"  # the answer goes on from "b"
    assert cont.template_kwargs == {"add_generation_prompt": False, "continue_final_message": True}
    with pytest.raises(InvalidRequest) as e:  # only streamed, as OpenAI's and vLLM's servers say
        parse_chat(body(stream_options={"include_usage": True}))
    assert e.value.param == "stream_options"
    assert parse_chat(body(logprobs=False, top_logprobs=0)).kind == "chat"  # SDK defaults: nothing asked
    # penalties and vLLM's cut-offs go to the engine as given; unset ones are not sent
    assert parse_chat(body()).sampling == ()
    schema = {"type": "object", "required": ["a"]}
    assert parse_chat(body(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})) \
        .response_format == {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    assert parse_chat(body(frequency_penalty=0.5, top_k=40, min_p=0.1, presence_penalty=None)).sampling == \
        (("frequency_penalty", 0.5), ("top_k", 40), ("min_p", 0.1))
    assert parse_chat(body(min_tokens=3, stop_token_ids=[7, 9])).sampling == (("min_tokens", 3), ("stop_token_ids", [7, 9]))
    assert parse_chat(body(logit_bias={"42": -100, "7": 2.5})).sampling == (("logit_bias", {42: -100, 7: 2.5}),)
    assert [parse_chat(body(**kw)).logprobs for kw in ({}, {"logprobs": True}, {"logprobs": True, "top_logprobs": 3},
                                                       {"logprobs": False, "top_logprobs": 0})] == [None, 0, 3, None]
    assert parse_completion(b'{"model": "m", "prompt": "a", "logprobs": 0}').logprobs == 0
    # vLLM's structured_outputs, as set (json under its own name); options alone constrain nothing
    assert parse_chat(body(structured_outputs={"json": {"type": "object"}, "disable_any_whitespace": True})) \
        .structured_outputs == {"json": {"type": "object"}, "disable_any_whitespace": True}
    assert parse_completion(b'{"model": "m", "prompt": "a", "structured_outputs": {"choice": ["x", "y"]}}') \
        .structured_outputs == {"choice": ["x", "y"]}
    assert parse_chat(body(structured_outputs={"disable_any_whitespace": True})).structured_outputs is None


def test_chat_parse_reads_tools_and_earlier_calls():
    p = parse_chat(body(tools=[TOOL]))
    as_vllm = {"type": "function", "function": {"name": "f", "description": None,  # as vLLM dumps it
                                                "parameters": TOOL["function"]["parameters"]}}
    assert (p.tools, p.tool_choice, p.tool_format) == ((as_vllm,), "auto", None)  # OpenAI's default with tools
    assert parse_chat(body()).tool_choice == "none"
    named = parse_chat(body(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}}))
    assert (named.tool_choice, named.tool_name) == ("function", "f")
    assert named.tool_format == {"type": "json_schema", "json_schema": {"name": "f", "schema": {"type": "object"}}}
    assert parse_chat(body(tools=[TOOL], tool_choice="none")).tool_format is None
    p = parse_chat(body(tools=[TOOL], messages=[
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"}]))
    # a template gets the arguments as an object (as vLLM hands them over) and the call's id
    assert p.messages == (
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None,  # as sent: the model's template sees it as vLLM passes it
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "done", "tool_call_id": "c1"})
    # the word template carries the tools and the call, so the prompt (and its cache blocks) differ
    assert p.prompt == ('<|tools|> [{"name": "f", "parameters": {"type": "object"}}] <|user|> go '
                        '<|assistant|>  <tool_call> {"name": "f", "arguments": {"x": 1}} </tool_call> '
                        '<|tool|> done <|assistant|>')


def test_completion_prompt_forms():
    assert parse_completion(b'{"model": "m", "prompt": "x y"}').prompt == "x y"
    assert parse_completion(b'{"model": "m", "prompt": ["x y"]}').prompt == "x y"
    p = parse_completion(b'{"model": "m", "prompt": [5, 6, 7]}')
    assert (p.prompt, p.prompt_token_ids, p.max_tokens) == ("", (5, 6, 7), 16)


def test_response_objects():
    r = Responder("chat", "abc", "m", include_usage=True, created=1700000000)
    assert r.chunk("hi", None, first=True) == {
        "id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 1700000000, "model": "m",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "logprobs": None,
                     "finish_reason": None, "stop_reason": None}], "usage": None}
    assert r.chunk("x", "length")["choices"][0]["delta"] == {"content": "x"}
    u = usage(10, 3, 8)
    assert u == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                 "prompt_tokens_details": {"cached_tokens": 8}}
    assert r.usage_chunk(u)["choices"] == [] and r.usage_chunk(u)["usage"] == u
    full = Responder("completion", "q", "m", created=1).full("t", "stop", u)
    assert full == {"id": "cmpl-q", "object": "text_completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "text": "t", "logprobs": None, "finish_reason": "stop",
                                 "stop_reason": None}],
                    "usage": u}


SSE = [
    ("object", {"a": 1, "b": [1, None]}, b'data: {"a":1,"b":[1,null]}\n\n'),
    ("unicode-unescaped", {"t": "café"}, 'data: {"t":"café"}\n\n'.encode()),
    ("newline-escaped", {"t": "a\nb"}, b'data: {"t":"a\\nb"}\n\n'),
    ("error-event", {"error": {"message": "m", "type": "server_error", "param": None, "code": None}},
     b'data: {"error":{"message":"m","type":"server_error","param":null,"code":null}}\n\n'),
]


@pytest.mark.parametrize("obj,wire", [c[1:] for c in SSE], ids=[c[0] for c in SSE])
def test_sse_event_bytes(obj, wire):
    assert sse.event(obj) == wire


def test_sse_done_and_media_type():
    assert sse.DONE == b"data: [DONE]\n\n"
    assert sse.MEDIA_TYPE == "text/event-stream"


def test_null_for_a_field_that_cannot_be_null_is_the_field_left_out():
    """The openai SDK sends `null` for a `None` it is given (`n=None`, `stream=None`)."""
    p = parse_chat(body(stream=None, n=None, ignore_eos=None, add_generation_prompt=None, temperature=None))
    assert (p.stream, p.n, p.ignore_eos, p.include_usage, p.temperature) == (False, 1, False, False, None)
    assert parse_chat(body(stream=True, stream_options={"include_usage": None})).include_usage is False
    assert parse_completion({"model": "m", "prompt": "x", "echo": None}).echo is False
    assert parse_completion({"model": "m", "prompt": "x"}).max_tokens == 16
    assert parse_completion({"model": "m", "prompt": "x", "max_tokens": None}).max_tokens is None  # the model's
    with pytest.raises(InvalidRequest) as e:
        parse_chat(body(messages=None))
    assert e.value.param == "messages"


def test_a_lone_surrogate_escape_is_a_400_and_a_pair_is_text():
    """Found by an API review: a lone \\ud800 passed parsing and failed the tokenizer with a 500."""
    with pytest.raises(InvalidRequest, match="lone surrogate"):
        parse_chat(rb'{"model": "m", "messages": [{"role": "user", "content": "a\ud800b"}]}')
    assert "\U0001f600" in parse_chat(rb'{"model": "m", "messages": [{"role": "user", "content": "\ud83d\ude00"}]}').prompt
    assert "\\ud800" in parse_chat(rb'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}').prompt


def test_a_completion_takes_one_prompt_of_text_or_ids_and_names_a_batch():
    assert parse_completion({"model": "m", "prompt": [[5, 6]]}).prompt_token_ids == (5, 6)  # [[ids]], as vLLM's
    for batch in ([[1, 2], [3, 4]], ["a", "b"]):
        with pytest.raises(InvalidRequest, match="Exactly one prompt") as e:
            parse_completion({"model": "m", "prompt": batch})
        assert e.value.param == "prompt"


@pytest.mark.parametrize("raw", [
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": '
    b'{"name": "f", "parameters": ' + b'{"a": ' * 126 + b"1" + b"}" * 126 + b"}}]}",
    b'{"model": "m", "messages": [{"role": "user", "content": "a\xed\xa0\x80b"}]}',  # an encoded surrogate
    '{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'.encode("utf-16"),
], ids=["deep", "just-too-deep", "raw-surrogate", "utf-16"])
def test_bodies_no_stage_could_take_are_a_400_not_a_500(raw):
    """Found by a review: JSON nested deeper than Python recurses, or a UTF-8-encoded surrogate
    (json.loads of bytes lets it through), reached later stages and failed there with a 500."""
    with pytest.raises(InvalidRequest) as e:
        parse_chat(raw)
    assert e.value.status == 400 and ("nested more than" in e.value.message or "not UTF-8" in e.value.message)


def test_a_body_nested_to_the_limit_is_read():
    schema: dict = {"type": "string"}
    for _ in range(60):  # a tool's schema 60 objects deep: 126 levels of JSON in the body
        schema = {"type": "object", "properties": {"a": schema}}
    p = parse_chat(body(tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}]))
    assert p.tools[0]["function"]["name"] == "f"


def test_a_utf8_bom_and_deep_nesting_outside_what_is_walked_are_read():
    """A byte-order mark is UTF-8 still (vLLM's server takes it); nesting in a field no stage
    walks costs nothing to let through (only json.loads' own limit applies there)."""
    raw = body()
    assert parse_chat(b"\xef\xbb\xbf" + raw).model == "m"
    deep = raw[:-1] + b', "x": ' + b"[" * 300 + b"]" * 300 + b"}"
    assert parse_chat(deep).model == "m"
