"""Fast checks of the benchmark helpers (no server): statistics, perf_analyzer input data and output
parsing, the OpenAI request mapping, and the results README / PASS-FAIL lines."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from benchmarks import perf_analyzer, report, serving_bench
from benchmarks.clients import Workload
from benchmarks.common import make_jpeg, make_mp4, summarize
from benchmarks.loadgen import LoadResult, RequestRecord


def test_summarize_percentiles_and_scale():
    s = summarize([0.001, 0.002, 0.003, 0.004, 0.005], scale=1e3)
    assert s["n"] == 5 and s["p50"] == pytest.approx(3.0) and s["min"] == pytest.approx(1.0)
    assert s["p99"] == pytest.approx(4.96)
    assert summarize([])["p50"] is None


def test_serialized_bytes_tensor_is_triton_wire_format():
    raw = perf_analyzer.serialize_bytes_tensor([b"ab", b"xyz"])
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 3) + b"xyz"


def test_image_input_data_holds_the_jpeg_and_valid_json_messages():
    data = perf_analyzer.input_data("image", max_tokens=7)["data"][0]
    assert set(data) == {"messages", "images", "params"}
    blob = base64.b64decode(data["images"]["b64"])
    (n,) = struct.unpack("<I", blob[:4])
    assert n == len(blob) - 4 and blob[4:6] == b"\xff\xd8"  # one JPEG element
    assert blob[4:] == make_jpeg(**perf_analyzer.IMAGE)
    messages = json.loads(data["messages"]["content"][0])
    assert messages[0]["content"][0] == {"type": "image", "index": 0}
    assert json.loads(data["params"]["content"][0])["max_tokens"] == 7


def test_committed_input_data_matches_the_generator():
    for kind in ("text", "image"):
        committed = json.loads((perf_analyzer.INPUT_DIR / f"{kind}.json").read_text())
        assert committed == perf_analyzer.input_data(kind)


def test_openai_kwargs_map_every_param():
    w = Workload(name="v", prompt="p", video=b"\x00\x00\x00\x18ftypmp42",
                 params={"max_tokens": 5, "temperature": 0.0, "seed": 1, "ignore_eos": True, "num_frames": 4,
                         "video_pruning_rate": 0.7, "max_num_tiles": 2})
    kw = w.openai_kwargs()
    assert kw["max_tokens"] == 5 and kw["seed"] == 1
    assert kw["extra_body"] == {"ignore_eos": True, "media_io_kwargs": {"video": {"num_frames": 4}},
                                "video_pruning_rate": 0.7, "mm_processor_kwargs": {"max_num_tiles": 2}}
    parts = w.openai_messages()[0]["content"]
    assert parts[0]["video_url"]["url"].startswith("data:video/mp4;base64,")
    assert w.triton_messages()[0]["content"][0] == {"type": "video", "index": 0}
    with pytest.raises(ValueError):
        Workload(name="x", prompt="p", params={"bogus": 1}).openai_kwargs()


def test_load_summary_counts_tokens_and_itl():
    recs = [RequestRecord(ok=True, start_s=0.0, e2e_s=0.31, ttft_s=0.01, completion_tokens=31),
            RequestRecord(ok=False, start_s=0.0, e2e_s=0.1, error="boom")]
    s = LoadResult(1, recs, wall_s=0.5).summary()
    assert s["errors"] == 1 and s["output_token_throughput_tps"] == pytest.approx(62.0)
    assert s["itl_ms"]["p50"] == pytest.approx(10.0)


def test_targets_and_readme_render_from_results():
    a = {"e2e_ms": {"p50": 11.0, "p99": 20.0}, "ttft_ms": {"p50": 3.0, "p99": 5.0}, "itl_ms": {"p50": 1.1, "p99": 2.0}}
    b = {"e2e_ms": {"p50": 10.0, "p99": 18.0}, "ttft_ms": {"p50": 2.0, "p99": 4.0}, "itl_ms": {"p50": 1.0, "p99": 1.5}}
    row = {"workload": "text", "concurrency": 1, "frontend_overhead": serving_bench.overhead(a, b)}
    targets = serving_bench.evaluate_targets([row])["by_workload"]["text"]
    assert targets["overhead_p50_ms"] == pytest.approx(1.0) and targets["request_pass"]
    assert targets["per_token_p50_ms"] == pytest.approx(0.1) and targets["token_pass"]
    results = {"serving": {"targets": serving_bench.evaluate_targets([row])},
               "batching": {"engine": {"speedup": 3.5, "pass": False, "target": 4.0}}}
    lines = report.target_lines(results)
    assert lines[0].startswith("PASS") and lines[-1].startswith("FAIL")
    assert "## Targets" in report.render_readme(results)


def test_generated_video_is_decodable():
    import io

    import av

    clip = make_mp4(64, 48, fps=4, num_frames=6)
    with av.open(io.BytesIO(clip)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 6
