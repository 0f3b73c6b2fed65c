"""`nemovl eval --dataset FILE --format NAME` against the real served stack (cpu engines from
data/tiny-trained, tritonserver, the OpenAI frontend), on small files written in each benchmark's public
layout from the synthetic task family the tiny checkpoint was trained on (`--prompt raw`: the
checkpoint only knows the synthetic questions' wording). Also checks that the files written are in the
benchmark's layout, field by field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from nemovl_trt.evaluation.synthetic import write_benchmark

pytestmark = pytest.mark.integration

N = {"docvqa": 6, "infovqa": 4, "chartqa": 5, "ai2d": 5, "videomme": 4}
MIN_SCORE = 0.75  # the checkpoint answers these types 100 % on 20 held-out questions each (docs/demo.md)


def _parquet_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def test_written_files_follow_the_public_layouts(tmp_path: Path):
    p = write_benchmark("docvqa", tmp_path / "d", 3)
    doc = json.loads(p.read_text())
    assert p.name == "val_v1.0.json" and doc["dataset_name"] == "docvqa" and len(doc["data"]) == 3
    assert set(doc["data"][0]) == {"questionId", "question", "question_types", "image", "docId", "ucsf_document_id",
                                   "ucsf_document_page_no", "answers", "data_split"}
    assert doc["data"][0]["image"].startswith("documents/") and (p.parent / doc["data"][0]["image"]).is_file()

    p = write_benchmark("chartqa", tmp_path / "c", 2)
    rows = json.loads(p.read_text())
    assert p.name == "test_human.json" and isinstance(rows, list) and set(rows[0]) == {"imgname", "query", "label"}
    assert (p.parent / "png" / rows[0]["imgname"]).is_file() and rows[0]["label"].isdigit()

    p = write_benchmark("ai2d", tmp_path / "a", 2)
    row = _parquet_rows(p)[0]
    assert {"question", "options", "answer", "image"} <= set(row) and set(row["image"]) == {"bytes", "path"}
    assert row["answer"] in {"0", "1", "2", "3"} and len(row["options"]) == 4
    assert row["image"]["bytes"][:4] == b"\x89PNG"

    p = write_benchmark("videomme", tmp_path / "v", 2)
    row = _parquet_rows(p)[0]
    assert p.parent.name == "videomme"
    assert {"video_id", "duration", "domain", "sub_category", "url", "videoID", "question_id", "task_type",
            "question", "options", "answer"} <= set(row)
    assert [o[:3] for o in row["options"]] == ["A. ", "B. ", "C. ", "D. "] and row["answer"] in "ABCD"
    assert (tmp_path / "v" / "data" / f"{row['videoID']}.mp4").is_file()


@pytest.mark.parametrize("fmt", list(N))
def test_eval_dataset_against_the_served_stack(fmt: str, trained_api: str, tmp_path: Path):
    from nemovl_trt.training.commands import eval_cmd

    path = write_benchmark(fmt, tmp_path, N[fmt])
    args = ["--server", trained_api, "--dataset", str(path), "--format", fmt, "--prompt", "raw", "--json",
            "--no-progress", "--max-tokens", "8", "--concurrency", "2", "--predictions", str(tmp_path / "p.jsonl")]
    if fmt == "videomme":
        args += ["--video-pruning-rate", "0.7"]  # the rate the checkpoint was trained with
    res = CliRunner().invoke(eval_cmd, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert out["n"] == N[fmt] == len(preds) and out["errors"] == 0
    assert out["metric"] == {"docvqa": "anls", "infovqa": "anls", "chartqa": "relaxed_accuracy"}.get(fmt, "accuracy")
    assert out["score"] >= MIN_SCORE, preds
    assert out["score"] == pytest.approx(sum(p["score"] for p in preds) / len(preds))
    if fmt == "videomme":
        assert out["groups"]["short"]["n"] == N[fmt]
