"""Property-based fuzzing of the HTTP API from its own OpenAPI document (GET /openapi.json, served by the
edge; nemovl_trt/serving/openapi.py) with schemathesis, against the frontend wired as `nemovl serve` wires
it, in front of the session's real tritonserver. Checks on every response: no 5xx, the status is one the
document lists, the content type and the body match it. Bounded by NEMOVL_FUZZ_SECONDS (default 45 s in
`make test`; `make fuzz` runs 600 s). Generation length is capped by tests/fuzz_hooks.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.faults_support import edge_frontend

pytestmark = pytest.mark.integration
SECONDS = int(os.environ.get("NEMOVL_FUZZ_SECONDS", "45"))
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
HOOKS = Path(__file__).parent / "fuzz_hooks.py"


def test_openapi_document_is_served_and_valid(triton_server) -> None:
    import schemathesis

    with edge_frontend(triton_server.grpc_url) as url:
        doc = httpx.get(url + "/openapi.json").json()
    schema = schemathesis.openapi.from_dict(doc)  # parses and resolves every $ref
    ops = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert ops >= {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
                   ("GET", "/v1/health/ready"), ("GET", "/metrics")}
    assert doc["paths"]["/v1/chat/completions"]["post"]["responses"]["503"]["content"]["application/json"]


def test_schemathesis_finds_no_server_error(triton_server, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "schemathesis"
    with edge_frontend(triton_server.grpc_url, request_timeout_s=90.0) as url:  # a hang shows up as a 504
        proc = subprocess.run(
            [str(exe), "run", f"{url}/openapi.json", "--max-time", str(SECONDS), "--checks", CHECKS,
             "--phases", "examples,coverage,fuzzing", "--workers", "1", "--seed", os.environ.get("NEMOVL_FUZZ_SEED",
                                                                                                 "20261203"),
             "--request-timeout", "120", "--report", "junit", "--report-dir", str(tmp_path)],
            env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "NO_COLOR": "1"}, cwd=tmp_path,
            capture_output=True, text=True, timeout=SECONDS + 240)
        still_ok = httpx.get(url + "/v1/health/ready", timeout=10).status_code
    out = proc.stdout + proc.stderr
    sys.stderr.write("\n" + "\n".join(out.strip().splitlines()[-12:]) + "\n")
    assert proc.returncode == 0, out[-6000:]
    m = re.search(r"(\d+) generated, (\d+) passed", out)
    assert m is not None and int(m.group(1)) >= 50 and m.group(1) == m.group(2), out[-2000:]
    assert still_ok == 200


def test_several_prompts_and_best_of_follow_the_document(triton_server) -> None:
    """The document's /v1/completions `prompt` (one prompt, or 1-16 of them) and `best_of` (1-8) say what the
    server does: bodies it accepts are answered 200 with prompts x n choices matching TextCompletion; bodies
    it refuses are 400s with the OpenAI error shape (never a 5xx)."""
    import jsonschema

    from nemovl_trt.serving.openapi import openapi_document
    from tests.faults_support import MODEL

    doc = openapi_document(MODEL, max_seq_len=8192)
    schemas = doc["components"]["schemas"]
    request = jsonschema.Draft4Validator(schemas["CompletionRequest"])  # OpenAPI 3.0 is draft-4 style
    answer = jsonschema.Draft4Validator(schemas["TextCompletion"])
    base = {"model": MODEL, "max_tokens": 3, "temperature": 0.0}
    accepted = [({"prompt": ["Hello", [1, 2, 3]], "n": 2}, 2 * 2),
                ({"prompt": ["a", "b", "c"], "best_of": 2}, 3 * 1),
                ({"prompt": ["x"] * 16}, 16),
                ({"prompt": [[5, 6]]}, 1)]
    refused = [{"prompt": []}, {"prompt": ["x"] * 17}, {"prompt": ["", "a"]}, {"prompt": [[]]},
               {"prompt": ["a"], "best_of": 9}, {"prompt": ["a"], "best_of": 0}, {"prompt": [["a"]]}]
    for extra, _ in accepted:
        request.validate({**base, **extra})
    for extra in refused:
        assert not request.is_valid({**base, **extra}), extra
    with edge_frontend(triton_server.grpc_url) as url:
        for extra, n_choices in accepted:
            r = httpx.post(url + "/v1/completions", json={**base, **extra}, timeout=120)
            assert r.status_code == 200, (extra, r.text)
            answer.validate(r.json())
            assert [c["index"] for c in r.json()["choices"]] == list(range(n_choices)), extra
        for extra in refused:
            r = httpx.post(url + "/v1/completions", json={**base, **extra}, timeout=60)
            assert r.status_code == 400, (extra, r.status_code, r.text)
            assert r.json()["error"]["param"] in ("prompt", "best_of"), (extra, r.text)
