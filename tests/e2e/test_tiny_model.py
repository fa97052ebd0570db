"""The offline tiny model: deterministic files, one word = one token, a chat template."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def _digest(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def test_same_seed_same_files_and_words_are_single_tokens(tiny_model, tmp_path):
    subprocess.run([sys.executable, "-m", "serving.models.tiny", str(tmp_path)], check=True,
                   stdout=subprocess.DEVNULL)
    assert _digest(tmp_path) == _digest(Path(tiny_model))

    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = AutoConfig.from_pretrained(tiny_model)
    words = json.loads((Path(tiny_model) / "proxima_words.json").read_text())
    text = "".join(" " + w for w in words["words"])
    assert tok(text, add_special_tokens=True)["input_ids"] == words["ids"]  # exact, no BOS added
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == ("llama", 256, 4, 2)
    size = sum(f.stat().st_size for f in Path(tiny_model).iterdir())
    assert size < 16 << 20

    chat = tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "hello"}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat == "<|begin|><|system|> be brief\n<|user|> hello\n<|assistant|>"
