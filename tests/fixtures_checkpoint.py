"""Session fixtures of the checkpoint area.

- `tiny_ckpt_dir`: a tiny `NemotronH_Nano_VL_V2` checkpoint (preset "tiny", seed 0) written once per test
  session into a temporary directory. Treat it as read-only: copy it before changing files.
- `tiny_checkpoint`: that directory loaded with `load_checkpoint` (float32 tensors).
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SEED = 0


@pytest.fixture(scope="session")
def tiny_ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nemovl_trt.checkpoint.synth import write_checkpoint

    out = tmp_path_factory.mktemp("tiny_ckpt")
    write_checkpoint(out, "tiny", seed=TINY_SEED)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_ckpt_dir: Path):
    from nemovl_trt.checkpoint.loader import load_checkpoint

    return load_checkpoint(tiny_ckpt_dir)
