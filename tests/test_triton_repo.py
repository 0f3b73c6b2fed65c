"""The repository generator: configs parse as Triton ModelConfigs with the documented interface, and the
checked-in triton_repo/ (and docs/triton.md) equal the generator's output for the tiny cpu engines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemovl_trt.triton import interface as itf
from nemovl_trt.triton.generator import CHECKED_IN_ENGINES_REF, RepoError, RepoOptions, generate_repository
from nemovl_trt.triton.pbtxt import ConfigError, parameters_of, parse_config

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / "triton_repo"
REGEN = (f"regenerate it: nemovl-build repo --engines <cpu engines of the tiny checkpoint, seed 0> "
         f"--out triton_repo --engines-ref {CHECKED_IN_ENGINES_REF}")


@pytest.fixture(scope="module")
def generated(cpu_engines_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("repo_sync") / "triton_repo"
    generate_repository(cpu_engines_dir, out, RepoOptions(engines_ref=CHECKED_IN_ENGINES_REF))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_checked_in_repository_equals_generator_output(generated: Path) -> None:
    want, have = _files(generated), _files(CHECKED_IN)
    assert sorted(have) == sorted(want), REGEN
    for name, data in want.items():
        assert have[name] == data, f"triton_repo/{name} differs from the generator's output; {REGEN}"


def test_docs_page_is_the_repository_readme() -> None:
    assert (ROOT / "docs" / "triton.md").read_text() == (CHECKED_IN / "README.md").read_text()


def test_no_machine_paths_in_checked_in_repository() -> None:
    for name, data in _files(CHECKED_IN).items():
        text = data.decode()
        assert "/tmp/" not in text and str(ROOT) not in text, name


def test_configs_match_the_documented_interface(generated: Path, cpu_engines_dir: Path) -> None:
    manifest = json.loads((cpu_engines_dir / "manifest.json").read_text())
    cfgs = {name: parse_config((generated / name / "config.pbtxt").read_text()) for name in itf.MODEL_NAMES}
    entry = cfgs["nemovl"]
    assert entry.backend == "python" and entry.max_batch_size == 0
    assert entry.model_transaction_policy.decoupled
    assert [(i.name, list(i.dims), i.optional) for i in entry.input] == [
        ("messages", [1], False), ("images", [-1], True), ("video", [1], True), ("tools", [1], True),
        ("params", [1], True), ("prompt", [1], True)]
    assert [(o.name, list(o.dims)) for o in entry.output] == [
        ("text", [1]), ("token_ids", [-1]), ("finish_reason", [1]), ("prompt_tokens", [1]),
        ("completion_tokens", [1]), ("info", [1]), ("index", [1]), ("logprobs", [1])]
    params = parameters_of(entry)
    lim = manifest["limits"]
    assert {k: params[k] for k in itf.NEMOVL_PUBLIC_PARAMETERS} == {
        "model_id": manifest["model_id"], "target": "cpu", "max_seq_len": str(lim["max_seq_len"]),
        "max_num_tiles": str(lim["max_num_tiles"]), "max_images": str(lim["max_images"]),
        "max_video_frames": str(lim["max_video_frames"]), "llm_precision": manifest["precisions"]["llm"],
        "vision_precision": manifest["precisions"]["vision"], "video_pruning_rate": "0.0"}
    vision = cfgs["vision_encoder"]
    assert vision.backend == "python" and vision.max_batch_size == lim["vision_max_batch_tiles"]
    assert vision.HasField("dynamic_batching")
    assert list(vision.input[0].dims) == [3, 512, 512]
    assert list(vision.output[0].dims) == manifest["vision"]["output_shape"][1:]
    assert cfgs["llm"].model_transaction_policy.decoupled
    assert all(c.instance_group[0].kind == 2 for c in cfgs.values())  # KIND_CPU
    assert all(c.instance_group[0].count == 1 for c in cfgs.values())


def test_gpu_target_uses_tensorrt_plan(cpu_engines_dir: Path, tmp_path: Path) -> None:
    engines = tmp_path / "engines"
    engines.mkdir()
    manifest = json.loads((cpu_engines_dir / "manifest.json").read_text())
    manifest["target"]["name"] = "h100"
    manifest["paths"]["vision_plan"] = "vision/model.plan"
    manifest["serving"] = {"preprocessor_instances": 1, "vision_instances": 2}  # per GPU
    (engines / "vision").mkdir()
    (engines / "vision" / "model.plan").write_bytes(b"plan")
    (engines / "manifest.json").write_text(json.dumps(manifest))
    files = generate_repository(engines, tmp_path / "repo")
    vision = parse_config((tmp_path / "repo" / "vision_encoder" / "config.pbtxt").read_text())
    assert vision.platform == "tensorrt_plan" and vision.instance_group[0].kind == 1  # KIND_GPU
    assert vision.instance_group[0].count == 2
    link = tmp_path / "repo" / "vision_encoder" / "1" / "model.plan"
    assert link.is_symlink() and link.read_bytes() == b"plan"
    assert Path("vision_encoder/1/model.py") not in files
    assert parameters_of(parse_config((tmp_path / "repo" / "nemovl" / "config.pbtxt").read_text()))["target"] == "h100"


def test_missing_manifest_and_bad_config_errors(tmp_path: Path) -> None:
    with pytest.raises(RepoError, match="manifest.json"):
        generate_repository(tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="does not parse"):
        parse_config('name: "x"\ninput { nme: "a" }')


def test_instance_counts_come_from_the_build_config_unless_given(cpu_engines_dir: Path, tmp_path: Path) -> None:
    import shutil

    from click.testing import CliRunner

    from nemovl_trt.cli import build_cli

    engines = tmp_path / "engines"
    shutil.copytree(cpu_engines_dir, engines)
    manifest = json.loads((engines / "manifest.json").read_text())
    manifest["serving"] = {"preprocessor_instances": 3, "vision_instances": 2}
    (engines / "manifest.json").write_text(json.dumps(manifest))

    def counts(out: Path) -> tuple[int, int]:
        cfg = {m: parse_config((out / m / "config.pbtxt").read_text()) for m in (itf.PREPROCESSOR_MODEL,
                                                                              itf.VISION_MODEL)}
        return cfg[itf.PREPROCESSOR_MODEL].instance_group[0].count, cfg[itf.VISION_MODEL].instance_group[0].count

    res = CliRunner().invoke(build_cli, ["repo", "--engines", str(engines), "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert counts(tmp_path / "a") == (3, 2)
    assert ("instances: preprocessor 3 (build config serving.preprocessor_instances), vision_encoder 2 "
            "(build config serving.vision_instances)") in res.output
    res = CliRunner().invoke(build_cli, ["repo", "--engines", str(engines), "--out", str(tmp_path / "b"),
                                         "--preprocessor-instances", "2"])
    assert res.exit_code == 0 and counts(tmp_path / "b") == (2, 2)
    assert "preprocessor 2 (--preprocessor-instances)" in res.output
    del manifest["serving"]
    (engines / "manifest.json").write_text(json.dumps(manifest))
    res = CliRunner().invoke(build_cli, ["repo", "--engines", str(engines), "--out", str(tmp_path / "c")])
    assert res.exit_code == 0 and counts(tmp_path / "c") == (1, 1)
    assert "preprocessor 1 (default), vision_encoder 1 (default)" in res.output
    manifest["serving"] = {"preprocessor_instances": 0}
    (engines / "manifest.json").write_text(json.dumps(manifest))
    res = CliRunner().invoke(build_cli, ["repo", "--engines", str(engines), "--out", str(tmp_path / "d")])
    assert res.exit_code == 1 and "preprocessor_instances must be at least 1, got 0." in res.output
    # the stream interval from an engines dir without it: one token per response; 0 refused like the counts
    llm_cfg = (tmp_path / "c" / "llm" / "config.pbtxt").read_text()
    assert 'key: "stream_interval"\n  value {\n    string_value: "1"' in llm_cfg
    manifest["serving"] = {"stream_interval": 0}
    (engines / "manifest.json").write_text(json.dumps(manifest))
    res = CliRunner().invoke(build_cli, ["repo", "--engines", str(engines), "--out", str(tmp_path / "e")])
    assert res.exit_code == 1 and "stream_interval must be at least 1, got 0." in res.output
