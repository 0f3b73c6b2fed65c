#!/usr/bin/env python3
"""Does this TensorRT-LLM take our precomputed vision embeddings? (docs/trtllm.md §3)

    python scripts/check_trtllm_hook.py [--require 0|1] [--json]

Prints the TensorRT-LLM version and whether upstream's Nano VL input processor has every member our
embeddings processor relies on (`nemovl_trt.runtime.trtllm_processor.REQUIRED_BASE_MEMBERS`:
``supports_token_id_mm_expansion``, ``_attach_multimodal_embeddings_impl``, ...; TensorRT-LLM from after
PR #14370, 2026-05). Exit 0 when they are there; when they are not (or TensorRT-LLM does not import):
exit 1 with ``--require 1``, else exit 0 after a warning. deploy/docker/Dockerfile runs it at build time.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def check() -> dict:
    """{"tensorrt_llm": version or None, "present": bool, "missing": [...], "error": str or None}."""
    from nemovl_trt.runtime.trtllm_processor import (
        REQUIRED_BASE_MEMBERS,
        UPSTREAM_MODEL_MODULE,
        UPSTREAM_PROCESSOR_CLASS,
    )

    try:
        version = importlib.metadata.version("tensorrt-llm")
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        base = getattr(importlib.import_module(UPSTREAM_MODEL_MODULE), UPSTREAM_PROCESSOR_CLASS)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return {"tensorrt_llm": version, "present": False, "missing": list(REQUIRED_BASE_MEMBERS),
                "error": f"cannot import {UPSTREAM_MODEL_MODULE}.{UPSTREAM_PROCESSOR_CLASS}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    missing = [n for n in REQUIRED_BASE_MEMBERS if not hasattr(base, n)]
    return {"tensorrt_llm": version, "present": not missing, "missing": missing, "error": None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--require", type=int, choices=(0, 1), default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = check()
    if args.json:
        print(json.dumps(res))
    elif res["present"]:
        print(f"TensorRT-LLM {res['tensorrt_llm']}: has the embeddings hook (docs/trtllm.md §3).")
    else:
        why = res["error"] or f"{', '.join(res['missing'])} missing"
        print(f"{'ERROR' if args.require else 'WARNING'}: TensorRT-LLM {res['tensorrt_llm']} cannot take "
              f"precomputed vision embeddings ({why}); the GPU targets need a TensorRT-LLM from after 2026-05 "
              f"(docs/trtllm.md §3).", file=sys.stderr)
    return 1 if (args.require and not res["present"]) else 0


if __name__ == "__main__":
    sys.exit(main())
