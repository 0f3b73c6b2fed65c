"""Shared pytest setup. Each pipeline area keeps its session fixtures in `tests/fixtures_<area>.py`
(owned by that area) and they are all registered here, so any test can use any fixture:
e.g. `tiny_ckpt_dir` (checkpoint), `cpu_engines_dir` (build), `triton_server` (triton), `api_server` (server).
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process: the test process, tritonserver's Python stubs and the frontend share
# 2 cores, and oversubscribed torch threads made the suite 2-5x slower here. Set before torch loads;
# subprocesses (tritonserver and its stubs) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = [
    "tests.fixtures_checkpoint",
    "tests.fixtures_build",
    "tests.fixtures_triton",
    "tests.fixtures_server",
]
