"""Loading a checkpoint directory: the tiny checkpoint loads, sharded == single, and every broken
checkpoint gives its one-sentence CheckpointError naming the file or tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nemovl_trt.checkpoint.config import CheckpointError
from nemovl_trt.checkpoint.loader import (
    GenerationConfig,
    load_checkpoint,
    load_tensors,
    parse_generation_config,
)
from nemovl_trt.checkpoint.synth import write_checkpoint

V = "vision_model.radio_model."
B = "language_model.backbone."
CLS = V + "model.patch_generator.cls_token.token"


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_sharded")
    write_checkpoint(out, "tiny", seed=0, shard_bytes=1_500_000)
    return out


@pytest.fixture
def ck(tiny_ckpt_dir: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the tiny checkpoint."""
    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt_dir, d)
    return d


def _edit_tensors(d: Path, edit) -> None:
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_tiny_loads(tiny_checkpoint, tiny_ckpt_dir):
    c = tiny_checkpoint
    assert c.path == tiny_ckpt_dir
    assert c.config.llm.hybrid_override_pattern == "M-M*-M*-"
    assert c.config.llm.num_layers_of == {"mamba": 3, "attention": 2, "mlp": 3}
    assert c.config.tokens_per_tile == 256 and c.config.vision.num_prefix_tokens == 4
    assert c.generation == GenerationConfig(eos_token_ids=(12, 2), bos_token_id=1, pad_token_id=0)
    assert c.tensors[V + "summary_idxs"].dtype == torch.int64
    assert all(t.dtype == torch.float32 for k, t in c.tensors.items() if not k.endswith("summary_idxs"))
    pre = json.loads((tiny_ckpt_dir / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == list(c.config.norm_mean) and pre["max_num_tiles"] == 12


def test_dtype_cast_keeps_integer_buffers(tiny_ckpt_dir):
    c = load_checkpoint(tiny_ckpt_dir, dtype="bfloat16")
    assert c.tensors[B + "embeddings.weight"].dtype == torch.bfloat16
    assert c.tensors[V + "summary_idxs"].dtype == torch.int64
    with pytest.raises(CheckpointError, match="unsupported dtype 'int3'"):
        load_checkpoint(tiny_ckpt_dir, dtype="int3")


def test_sharded_equals_single(tiny_checkpoint, sharded_dir):
    shards = sorted(p.name for p in sharded_dir.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (sharded_dir / "model.safetensors").exists()
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tiny_checkpoint.tensors)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tiny_checkpoint.tensors.values())
    s = load_checkpoint(sharded_dir)
    assert s.tensors.keys() == tiny_checkpoint.tensors.keys()
    assert all(torch.equal(s.tensors[k], tiny_checkpoint.tensors[k]) for k in s.tensors)
    assert s.config == tiny_checkpoint.config


def test_same_seed_is_byte_identical_other_seed_differs(tiny_ckpt_dir, tmp_path):
    write_checkpoint(tmp_path / "a", "tiny", seed=0)
    write_checkpoint(tmp_path / "b", "tiny", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json",
                 "generation_config.json", "preprocessor_config.json", "special_tokens_map.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tiny_ckpt_dir / name).read_bytes(), name
    assert (tmp_path / "b" / "model.safetensors").read_bytes() != (tiny_ckpt_dir / "model.safetensors").read_bytes()
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() != (tiny_ckpt_dir / "tokenizer.json").read_bytes()
    load_checkpoint(tmp_path / "b")  # another seed is still a valid checkpoint


# ---- every loading error ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("missing", "message"), [
    ("config.json", r"config\.json is missing from"),
    ("tokenizer.json", r"tokenizer\.json is missing from"),
    ("tokenizer_config.json", r"tokenizer_config\.json is missing from"),
    ("model.safetensors", r"has neither model\.safetensors nor model\.safetensors\.index\.json"),
])
def test_missing_file(ck, missing, message):
    (ck / missing).unlink()
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ck)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_unknown_architecture(ck):
    def edit(c):
        c["architectures"] = ["LlavaForConditionalGeneration"]
        c["model_type"] = "llava"
    _edit_json(ck / "config.json", edit)
    with pytest.raises(CheckpointError, match=r"config\.json declares architecture \['LlavaForConditionalGeneration'\]; "
                                              r"only NemotronH_Nano_VL_V2 is supported"):
        load_checkpoint(ck)


def test_missing_tensor(ck):
    name = B + "layers.3.mixer.k_proj.weight"
    _edit_tensors(ck, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors is missing tensor '{name}' \(expected shape \[64, 128\]\)"):
        load_checkpoint(ck)


def test_optional_buffers_may_be_absent(ck):
    def edit(t):
        for k in ("summary_idxs", "input_conditioner.norm_mean", "input_conditioner.norm_std"):
            t.pop(V + k)
    _edit_tensors(ck, edit)
    assert V + "summary_idxs" not in load_checkpoint(ck).tensors


def test_unexpected_tensor(ck):
    name = V + "model.blocks.0.ls1.gamma"
    _edit_tensors(ck, lambda t: t.__setitem__(name, torch.ones(64)))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors has unexpected tensor '{name}' \(shape \[64\]\)"):
        load_checkpoint(ck)


def test_wrong_shape(ck):
    name = B + "layers.0.mixer.in_proj.weight"
    _edit_tensors(ck, lambda t: t.__setitem__(name, torch.zeros(320, 128)))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape \[320, 128\], expected \[328, 128\]"):
        load_checkpoint(ck)


def test_integer_tensor_where_float_expected(ck):
    name = "mlp1.1.weight"
    _edit_tensors(ck, lambda t: t.__setitem__(name, t[name].to(torch.int32)))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has dtype torch.int32, expected a floating-point"):
        load_checkpoint(ck)


def test_float8_tensor_in_unquantized_checkpoint(ck):
    name = B + "layers.1.mixer.up_proj.weight"
    _edit_tensors(ck, lambda t: t.__setitem__(name, t[name].to(torch.float8_e4m3fn)))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has dtype torch.float8_e4m3fn but config\.json "
                                              r"declares no quantization_config"):
        load_checkpoint(ck)


def test_float_summary_idxs(ck):
    name = V + "summary_idxs"
    _edit_tensors(ck, lambda t: t.__setitem__(name, t[name].float()))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has dtype torch.float32, expected an integer"):
        load_checkpoint(ck)


def test_quantized_config_is_rejected(ck):
    _edit_json(ck / "config.json", lambda c: c.__setitem__("quantization_config", {"quant_method": "modelopt"}))
    with pytest.raises(CheckpointError, match="declares a quantization_config"):
        load_checkpoint(ck)


def test_cls_rows_vs_prefix_tokens(ck):
    _edit_tensors(ck, lambda t: t.__setitem__(CLS, torch.zeros(8, 64)))
    with pytest.raises(CheckpointError, match=r"has 8 prefix-token rows but config\.json vision_config implies "
                                              r"2 CLS \+ 2 register tokens = 4"):
        load_checkpoint(ck)


def test_vocab_size_vs_embedding_rows(ck):
    _edit_json(ck / "config.json", lambda c: c["llm_config"].__setitem__("vocab_size", 2048))
    with pytest.raises(CheckpointError, match=r"'language_model\.backbone\.embeddings\.weight' has 1512 rows but "
                                              r"config\.json llm_config\.vocab_size is 2048"):
        load_checkpoint(ck)


def test_tokenizer_larger_than_vocab(ck):
    _edit_json(ck / "config.json", lambda c: c["llm_config"].__setitem__("vocab_size", 1000))
    with pytest.raises(CheckpointError, match=r"vocab_size is 1000 but the tokenizer has 1512 ids"):
        load_checkpoint(ck)


def test_img_context_token_id_vs_tokenizer(ck, tiny_checkpoint):
    _edit_json(ck / "config.json", lambda c: c.__setitem__("img_context_token_id", 131072))
    image_id = tiny_checkpoint.tokenizer.special["<image>"]
    with pytest.raises(CheckpointError, match=rf"img_context_token_id is 131072 but the tokenizer maps '<image>' "
                                              rf"to {image_id}"):
        load_checkpoint(ck)


def test_index_names_missing_shard(sharded_dir, tmp_path):
    d = tmp_path / "sh"
    shutil.copytree(sharded_dir, d)
    gone = sorted(d.glob("model-*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json maps tensor '.+' to shard "
                                              rf"'{gone.name}', which does not exist"):
        load_tensors(d)


def test_index_and_shard_disagree(sharded_dir, tmp_path):
    d = tmp_path / "sh"
    shutil.copytree(sharded_dir, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "mlp1.0.weight"
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    index["weight_map"][name] = other
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"maps tensor '{name}' to {other}, but that shard does not contain it"):
        load_tensors(d)


def test_index_without_weight_map(sharded_dir, tmp_path):
    d = tmp_path / "sh"
    shutil.copytree(sharded_dir, d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="has no 'weight_map' object"):
        load_tensors(d)


def test_corrupt_safetensors(ck):
    (ck / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        load_checkpoint(ck)


def test_invalid_json(ck):
    (ck / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_checkpoint(ck)


@pytest.mark.parametrize(("eos", "expected"), [(7, (7,)), ([12, 2], (12, 2))])
def test_generation_config_eos_int_or_list(eos, expected):
    assert parse_generation_config({"eos_token_id": eos}).eos_token_ids == expected


def test_generation_config_bad_eos():
    with pytest.raises(CheckpointError, match="eos_token_id must be an integer or a non-empty list"):
        parse_generation_config({"eos_token_id": "</s>"})


def test_generation_config_missing_falls_back_to_tokenizer(ck):
    (ck / "generation_config.json").unlink()
    c = load_checkpoint(ck)
    assert c.generation.eos_token_ids == (12,)  # tokenizer_config eos_token <SPECIAL_12>
