"""`nemovl-build make-checkpoint`: the real console script and the click command in-process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from nemovl_trt.checkpoint.config import load_vlm_config
from nemovl_trt.checkpoint.loader import load_checkpoint
from nemovl_trt.cli import build_cli

SCRIPT = Path(sys.executable).with_name("nemovl-build")


def test_console_script_writes_a_loadable_tiny_checkpoint(tmp_path, tiny_ckpt_dir):
    out = tmp_path / "t"
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-c", "from nemovl_trt.cli import build_cli; build_cli()"]
    res = subprocess.run([*cmd, "make-checkpoint", "--preset", "tiny", "--out", str(out), "--seed", "0"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert res.returncode == 0, res.stderr
    assert f"wrote tiny checkpoint (seed 0) to {out}: 7 files" in res.stdout
    assert "model.safetensors" in res.stdout and "MiB" in res.stdout
    assert (out / "model.safetensors").read_bytes() == (tiny_ckpt_dir / "model.safetensors").read_bytes()
    load_checkpoint(out)


def test_shard_size_option(tmp_path):
    out = tmp_path / "s"
    res = CliRunner().invoke(build_cli, ["make-checkpoint", "--out", str(out), "--shard-size", "2000000"])
    assert res.exit_code == 0, res.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-0000{len(shards)}.safetensors" for i in range(1, len(shards) + 1)]
    assert all((out / s).stat().st_size <= 2_000_000 + 64 * 1024 for s in shards)  # + safetensors header
    load_checkpoint(out)


def test_refuses_non_empty_out_unless_force(tmp_path, tiny_ckpt_dir):
    out = tmp_path / "busy"
    shutil.copytree(tiny_ckpt_dir, out)
    (out / "notes.txt").write_text("mine")
    res = CliRunner().invoke(build_cli, ["make-checkpoint", "--out", str(out)])
    assert res.exit_code == 1
    assert f"Error: {out} exists and is not empty; choose another --out or pass --force." in res.output
    assert "Traceback" not in res.output
    # --force rewrites the checkpoint as shards: the old single file goes, the user's own file stays
    res = CliRunner().invoke(build_cli, ["make-checkpoint", "--out", str(out), "--force", "--shard-size", "3000000"])
    assert res.exit_code == 0, res.output
    assert not (out / "model.safetensors").exists() and (out / "notes.txt").read_text() == "mine"
    load_checkpoint(out)


def test_12b_config_preset_matches_spec(tmp_path):
    out = tmp_path / "12b"
    res = CliRunner().invoke(build_cli, ["make-checkpoint", "--preset", "12b-config", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                     "preprocessor_config.json"]
    cfg = load_vlm_config(out)
    llm = cfg.llm
    assert llm.num_layers_of == {"mamba": 28, "attention": 6, "mlp": 28}
    assert [i for i, c in enumerate(llm.hybrid_override_pattern) if c == "*"] == [7, 16, 25, 34, 43, 52]
    assert (llm.hidden_size, llm.num_hidden_layers, llm.intermediate_size) == (5120, 62, 20480)
    assert (llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim) == (40, 8, 128)
    assert (llm.mamba_num_heads, llm.mamba_head_dim, llm.ssm_state_size, llm.n_groups) == (128, 80, 128, 8)
    assert (llm.mamba_d_inner, llm.mamba_conv_dim, llm.mamba_in_proj_dim) == (10240, 12288, 22656)
    assert cfg.tokens_per_tile == 256 and cfg.shuffled_dim == 5120 and cfg.projector_hidden_size == 20480
    assert (cfg.vision.hidden_size, cfg.vision.num_hidden_layers, cfg.vision.num_attention_heads) == (1280, 32, 16)
    assert cfg.vision.pos_grid == 128 and cfg.vision.num_prefix_tokens == 8
    assert cfg.img_context_token_id == 131072 and cfg.video_pruning_rate == 0.7
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [12, 2]


def test_unknown_preset_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(build_cli, ["make-checkpoint", "--preset", "huge", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "'huge' is not one of" in res.output
