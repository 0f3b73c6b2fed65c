"""The tiny tokenizer: Nemotron special-token layout, other VL ids than the 12B, exact round trips,
determinism, and agreement with transformers' own tokenizer loading and `apply_chat_template`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from nemovl_trt.checkpoint.config import CheckpointError, load_vlm_config
from nemovl_trt.checkpoint.tokenizer import VL_TOKENS, load_tokenizer, train_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_ckpt_dir: Path):
    return load_tokenizer(tiny_ckpt_dir)


def test_special_token_layout(tok, tiny_ckpt_dir):
    # Nemotron layout: <unk>=0, <s>=1, </s>=2, <SPECIAL_k>=k (so the chat format's 10/11/12 exist).
    assert [tok.special[t] for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    for k in (3, 10, 11, 12):
        assert tok.special[f"<SPECIAL_{k}>"] == k
    # VL/think/tool tokens follow the BPE vocabulary, consecutively, in VL_TOKENS order.
    vl_ids = [tok.special[t] for t in VL_TOKENS]
    assert vl_ids == list(range(vl_ids[0], vl_ids[0] + len(VL_TOKENS)))
    assert vl_ids[-1] == tok.vocab_size - 1
    assert 1000 <= tok.vocab_size <= 2000
    assert tok.special["<image>"] != 131072 and tok.special["<img>"] != 131073  # not the 12B's ids
    cfg = load_vlm_config(tiny_ckpt_dir)
    assert cfg.img_context_token_id == tok.special["<image>"]
    assert cfg.video_context_token_id == tok.special["<video>"]
    assert cfg.llm.vocab_size == tok.vocab_size
    assert tok.bos_id == 1
    assert tok.eos_ids == (tok.special["<SPECIAL_12>"], tok.special["</s>"])


def test_special_strings_in_text_map_to_single_ids(tok):
    ids = tok.encode("Look: <img><image><image></img>\n<think>\nok</think>")
    s = tok.special
    assert ids.count(s["<image>"]) == 2
    i = ids.index(s["<img>"])
    assert ids[i:i + 4] == [s["<img>"], s["<image>"], s["<image>"], s["</img>"]]
    assert s["<think>"] in ids and s["</think>"] in ids
    # no BOS/EOS wrapping
    assert ids[0] != tok.bos_id and ids[-1] not in tok.eos_ids
    # a near-miss is ordinary text
    assert s["<image>"] not in tok.encode("<image >") and s["<image>"] not in tok.encode("<Image>")


@pytest.mark.parametrize("text", [
    "How many red squares are there? There are 12.",
    "Frame 3 sampled at 1.50 seconds: <img><image></img>\n",
    '{"name": "get_weather", "arguments": {"city": "Zürich", "n": [1, 2.5, null]}}',
    "  leading and trailing spaces  \n\n\ttabs\r\n",
    "unicode: héllo 世界 🙂 — ½ ∑",
    "<SPECIAL_11>Assistant\n<think></think>Red.<SPECIAL_12>",
    "",
])
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_skip_special_tokens(tok):
    ids = tok.encode("<think>\nhm</think>Blue circle.<SPECIAL_12>")
    assert tok.decode(ids, skip_special_tokens=True) == "\nhmBlue circle."


def test_common_words_are_single_tokens(tok):
    # The corpus covers the words the tests and demos use, so prompts stay short.
    for word in (" red", " blue", " square", " circle", " many", " frame", " seconds", " which", "Which"):
        assert len(tok.encode(word)) == 1, word


def test_training_is_deterministic_per_seed():
    a_json, a_cfg = train_tiny_tokenizer(0)
    b_json, b_cfg = train_tiny_tokenizer(0)
    c_json, _ = train_tiny_tokenizer(1)
    assert json.dumps(a_json) == json.dumps(b_json) and a_cfg == b_cfg
    assert a_json["model"]["merges"] != c_json["model"]["merges"]
    # the written file is exactly what training produced
    assert Tokenizer.from_str(json.dumps(a_json)).get_vocab_size(with_added_tokens=True) > 1000


def test_tokenizer_config_like_hf(tiny_ckpt_dir):
    cfg = json.loads((tiny_ckpt_dir / "tokenizer_config.json").read_text())
    dec = cfg["added_tokens_decoder"]
    assert dec["0"]["content"] == "<unk>" and dec["12"]["content"] == "<SPECIAL_12>"
    assert all(v["special"] for v in dec.values()) and len(dec) == 20 + len(VL_TOKENS)
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"]) == ("<s>", "<SPECIAL_12>", "<unk>")
    assert cfg["model_max_length"] == load_vlm_config(tiny_ckpt_dir).max_sequence_length
    assert "<SPECIAL_10>System" in cfg["chat_template"]
    stm = json.loads((tiny_ckpt_dir / "special_tokens_map.json").read_text())
    assert stm["eos_token"]["content"] == "<SPECIAL_12>" and "<image>" in stm["additional_special_tokens"]


def test_transformers_loads_it_identically(tok, tiny_ckpt_dir):
    """Independent oracle: transformers' AutoTokenizer + apply_chat_template on the same directory."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_ckpt_dir))
    assert len(hf) == tok.vocab_size and hf.eos_token_id == tok.special["<SPECIAL_12>"]
    msgs = [{"role": "system", "content": "Be brief. /no_think"},
            {"role": "user", "content": [{"type": "image", "index": 0}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "<think>x</think>Red.",
             "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
            {"role": "tool", "content": "ok"},
            {"role": "user", "content": "Why? /think"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    text = tok.render(msgs, tools=tools)
    assert hf.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True) == text
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text


def test_missing_tokenizer_files(tiny_ckpt_dir, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt_dir, d)
    (d / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json is missing from"):
        load_tokenizer(d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is missing from"):
        load_tokenizer(d)


def test_missing_chat_template(tiny_ckpt_dir, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has no chat_template"):
        load_tokenizer(d)
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # the separate-file form
    assert load_tokenizer(d).render([{"role": "user", "content": "hi"}]) == "hi"
