"""End-to-end accuracy of the trained tiny checkpoint through the whole served stack: cpu engines built
from data/tiny-trained (ONNX vision on ONNX Runtime + the reference LLM), the generated Triton repository
on a real tritonserver, the OpenAI frontend, questions sent with the openai SDK. A wrong tile order,
thumbnail, normalization, placeholder or EVS layout anywhere in the chain shows up as lost accuracy.

The check can fail: with max_num_tiles = 1 the `detail` questions (answer visible only in the full-
resolution tiles) must drop by at least DETAIL_DROP.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from nemovl_trt.training.evaluate import evaluate
from nemovl_trt.training.tasks import QUESTION_TYPES

pytestmark = pytest.mark.integration

# Held-out seeds (the eval split never overlaps training's). The gate holds on each of them, not on one lucky
# seed: scripts/accuracy_seeds.py measured the committed checkpoint on 8 other unseen seeds (docs/demo.md).
EVAL_SEEDS = (4242, 5151, 6060)
EVAL_SEED = EVAL_SEEDS[0]
PER_TYPE = 12
MIN_ACCURACY = 0.9  # every type on every seed (11 of 12); measured 100 % on 8 × 20 per type (docs/demo.md)
DETAIL_DROP = 0.4  # 3 answers: near-perfect with the tiles, about chance (1/3) without


@pytest.fixture(scope="module")
def results(trained_api: str) -> dict:
    return {seed: evaluate(trained_api, n=PER_TYPE * len(QUESTION_TYPES), seed=seed, concurrency=4)
            for seed in EVAL_SEEDS}


@pytest.fixture(scope="module")
def full_result(results: dict):
    return results[EVAL_SEED]


@pytest.mark.parametrize("seed", EVAL_SEEDS)
def test_every_question_type_is_answered_correctly(results: dict, seed: int) -> None:
    res = results[seed]
    assert set(res.per_type) == set(QUESTION_TYPES)
    assert all(n == PER_TYPE for n in res.counts.values())
    wrong = [(r.qtype, r.answer, r.prediction) for r in res.records if not r.correct]
    low = {t: acc for t, acc in res.per_type.items() if acc < MIN_ACCURACY}
    assert not low, f"seed {seed}: accuracy below the bound: {low}; wrong answers: {wrong}"


def test_single_tile_budget_loses_the_full_resolution_type(trained_api: str, full_result) -> None:
    one = evaluate(trained_api, n=PER_TYPE, seed=EVAL_SEED, max_num_tiles=1, types=("detail",))
    drop = full_result.per_type["detail"] - one.per_type["detail"]
    assert drop >= DETAIL_DROP, (full_result.per_type["detail"], one.per_type["detail"])


def test_eval_command_json_with_loopback_urls(trained_api: str) -> None:
    from nemovl_trt.training.commands import eval_cmd

    res = CliRunner().invoke(eval_cmd, ["--server", trained_api, "--n", str(len(QUESTION_TYPES)), "--json",
                                        "--urls", "--seed", str(EVAL_SEED)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert set(out) == {"per_type", "overall"}
    assert set(out["per_type"]) == set(QUESTION_TYPES)
    assert 0.0 <= out["overall"] <= 1.0


def test_eval_command_reports_an_unreachable_server() -> None:
    from nemovl_trt.training.commands import eval_cmd

    res = CliRunner().invoke(eval_cmd, ["--server", "http://127.0.0.1:9", "--n", "1"])
    assert res.exit_code == 1
    assert "cannot reach the server" in res.output
    assert "Traceback" not in res.output
