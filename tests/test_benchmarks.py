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


def test_sse_payloads_split_across_reads():
    from benchmarks.clients import sse_payloads

    buf = bytearray()
    assert sse_payloads(buf, b'data: {"a":1}\n\ndata: {"b"') == [b'{"a":1}']
    assert sse_payloads(buf, b':2}\n') == []
    assert sse_payloads(buf, b'\ndata: [DONE]\n\n') == [b'{"b":2}', b"[DONE]"] and buf == bytearray()


def _row(workload: str, raw_p50: float, sdk_p50: float, tok: float) -> dict:
    def summary(e2e: float, itl: float) -> dict:
        return {"e2e_ms": {"p50": e2e, "p99": e2e}, "ttft_ms": {"p50": 10.0, "p99": 10.0},
                "itl_ms": {"p50": itl, "p99": itl}}

    b = summary(100.0, 2.0)
    raw, sdk = summary(100.0 + raw_p50, 2.0 + tok), summary(100.0 + sdk_p50, 2.0)
    return {"workload": workload, "concurrency": 1, "triton": b, "openai": sdk, "raw_sse": raw,
            "frontend_overhead": serving_bench.overhead(sdk, b),
            "frontend_overhead_raw_sse": serving_bench.overhead(raw, b),
            "paired_overhead_raw_sse": {"e2e_ms": {"n": 40, "median": raw_p50, "ci95": [0.1, 2.9]}},
            "frontend_cpu_ms_per_request": 7.5}


def test_frontend_targets_judge_the_plain_client_and_keep_the_sdk_row():
    targets = serving_bench.frontend_targets([_row("text", 1.5, 6.0, 0.05), _row("image", 3.0, 9.0, 0.5)],
                                             {"p50": 1.1})
    by_name = {t["name"]: t for t in targets}
    raw = by_name["frontend overhead per request, text, c=1, plain httpx client"]
    assert raw["pass"] and raw["value"] == pytest.approx(1.5) and "CPU 7.50 ms/request" in raw["detail"]
    assert "paired median 1.50 ms, 95% CI [0.10, 2.90]" in raw["detail"]
    sdk = by_name["frontend overhead per request, text, c=1, OpenAI SDK client"]
    assert not sdk["pass"] and sdk["value"] == pytest.approx(6.0)
    assert by_name["frontend overhead per streamed token, text, c=1, plain httpx client"]["pass"]
    assert not by_name["frontend overhead per request, image, c=1, plain httpx client"]["pass"]
    assert not by_name["frontend overhead per streamed token, image, c=1, plain httpx client"]["pass"]
    assert len(targets) == 6 and all(set(t) == {"name", "value", "goal", "pass", "detail"} for t in targets)
    lines = report.target_lines({"serving": {"frontend": {"targets": targets}}})
    assert sum(line.startswith("PASS") for line in lines) == 2 and len(lines) == 6


def test_aiperf_dataset_sends_our_exact_request():
    from benchmarks import aiperf_bench
    from benchmarks.clients import RawSSEClient

    w = serving_bench.build_workloads(16)["image"]
    line = json.loads(aiperf_bench.dataset_lines(w, 3, 16)[0])
    ours = json.loads(RawSSEClient("http://x/v1", "m").body(w))
    parts = ours["messages"][0]["content"]
    assert line["image"] == parts[0]["image_url"]["url"] and line["text"] == parts[1]["text"]
    assert line["output_length"] == ours["max_tokens"] == 16
    assert aiperf_bench.extra_inputs(w) == {"temperature": 0.0, "seed": 0, "ignore_eos": True}
    assert {k: ours[k] for k in ("temperature", "seed", "ignore_eos")} == aiperf_bench.extra_inputs(w)
    with pytest.raises(ValueError):
        aiperf_bench.dataset_lines(serving_bench.build_workloads(4)["video"], 1, 4)


def test_aiperf_export_parsing_and_agreement(tmp_path):
    from benchmarks import aiperf_bench

    export = {"aiperf_version": "0.13.0", "request_count": {"avg": 12.0}, "request_throughput": {"avg": 9.0},
              "time_to_first_token": {"p50": 16.0, "p90": 20.0, "p99": 25.0, "avg": 17.0},
              "inter_token_latency": {"p50": 2.5, "p90": 2.7, "p99": 3.0, "avg": 2.5},
              "request_latency": {"p50": 95.0, "p90": 99.0, "p99": 101.0, "avg": 96.0},
              "output_token_throughput": {"avg": 288.0}, "input_sequence_length": {"avg": 43.0},
              "output_sequence_length": {"avg": 32.0}, "benchmark_duration": {"avg": 1.3}}
    (tmp_path / "profile_export_aiperf.json").write_text(json.dumps(export))
    got = aiperf_bench.parse_export(tmp_path / "profile_export_aiperf.json")
    assert (got["ttft_p50_ms"], got["itl_p50_ms"], got["e2e_p99_ms"]) == (16.0, 2.5, 101.0)
    assert got["request_throughput_rps"] == 9.0 and got["prompt_tokens_mean"] == 43.0 and got["error_rate_pct"] == 0
    own = [{"ttft_p50_ms": 14.0, "itl_p50_ms": 2.4, "e2e_p50_ms": 94.0, "request_throughput_rps": 10.0},
           {"ttft_p50_ms": 15.0, "itl_p50_ms": 2.6, "e2e_p50_ms": 96.0, "request_throughput_rps": 10.0}]
    a = aiperf_bench.agreement(got, own)["by_metric"]
    # TTFT: ours 14.5, spread 1.0 → tolerance max(1.45, 2.0) = 2.0, |16 − 14.5| / 2 = 0.75
    assert a["ttft_p50_ms"]["tolerance"] == pytest.approx(2.0) and a["ttft_p50_ms"]["ratio"] == pytest.approx(0.75)
    # throughput: no spread → 10 % of 10 = 1.0, |9 − 10| / 1 = 1.0 (just within)
    assert a["request_throughput_rps"]["ratio"] == pytest.approx(1.0)
    assert aiperf_bench.agreement(got, own)["worst_ratio"] == pytest.approx(1.0)
    missing = aiperf_bench.agreement({**got, "itl_p50_ms": None}, own)
    assert missing["worst_ratio"] == float("inf")  # a metric AIPerf did not report never passes


def test_aiperf_cli_takes_every_flag_we_pass(tmp_path):
    """Contract with the installed AIPerf (skipped until `setup_aiperf` has made .cache/aiperf-venv)."""
    import subprocess

    from benchmarks import aiperf_bench

    exe = aiperf_bench.AIPERF_VENV / "bin" / "aiperf"
    if not exe.exists():
        pytest.skip("AIPerf is not installed (python -m benchmarks.aiperf_bench installs it)")
    help_text = subprocess.run([str(exe), "profile", "--help"], capture_output=True, text=True, timeout=120).stdout
    cmd = aiperf_bench.aiperf_command(exe, "http://127.0.0.1:1", "m", tmp_path, tmp_path / "d.jsonl", 4, 8, 1,
                                      tmp_path / "out", {"seed": 0})
    flags = [a for a in cmd if a.startswith("--")]
    assert len(flags) >= 15 and [f for f in flags if f not in help_text] == []
    assert aiperf_bench.installed_version() == aiperf_bench.AIPERF_SPEC.partition("==")[2]


def test_py_spy_raw_profile_summary(tmp_path):
    raw = tmp_path / "p.txt"
    raw.write_text("main (a.py:1);f (b.py:10) 30\nmain (a.py:1);f (b.py:12) 10\nmain (a.py:1);g (c.py:3) 60\n")
    s = serving_bench.profile_summary(raw, top=5)
    assert s["samples"] == 100
    assert s["self_time_share"] == [{"frame": "g (c.py)", "share": 0.6}, {"frame": "f (b.py)", "share": 0.4}]


def test_process_cpu_s_resolves_milliseconds_and_agrees_with_the_process_clock() -> None:
    """The frontend-CPU figure of the serving bench: per-thread schedstat nanoseconds, not 10 ms ticks."""
    import os
    import time

    from benchmarks.serving_bench import process_cpu_s

    pid = os.getpid()
    a, pa = process_cpu_s(pid), time.process_time()
    x = 0
    while time.process_time() - pa < 0.03:  # burn ~30 ms of CPU
        x += 1
    b, pb = process_cpu_s(pid), time.process_time()
    assert a is not None and b is not None and x > 0
    assert abs((b - a) - (pb - pa)) < 0.005  # same CPU, measured two ways, within 5 ms
    assert (b - a) * 1000 % 10 != 0  # not a whole number of 10 ms ticks
