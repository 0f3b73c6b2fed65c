"""Session fixtures of the build area."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner


@pytest.fixture(scope="session")
def cpu_engines_dir(tiny_ckpt_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`nemovl-build engines --target cpu` on the tiny checkpoint, built once per test session (~10 s)."""
    from nemovl_trt.cli import build_cli

    out = tmp_path_factory.mktemp("engines") / "cpu"
    result = CliRunner().invoke(build_cli, ["engines", "--target", "cpu", "--checkpoint", str(tiny_ckpt_dir),
                                            "--out", str(out)])
    if result.exit_code != 0:
        raise RuntimeError(f"engines --target cpu failed (exit {result.exit_code}):\n{result.output}")
    return out
