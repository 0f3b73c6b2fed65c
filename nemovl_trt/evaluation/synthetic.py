"""Small benchmark files in the public formats, made from the synthetic task family
(`nemovl_trt.training.tasks`, held-out split "eval"), so the benchmark path can be exercised end to end
with the tiny trained checkpoint (which answers those questions) and without downloading a dataset.

Each writer produces what the benchmark ships (field names and layout as in `formats`):

- ``docvqa``: ``val_v1.0.json`` (``{"dataset_name": "docvqa", ..., "data": [...]}``) + ``documents/*.png``;
  types ``read``, ``color``, ``shape``.
- ``infovqa``: a lmms-lab-style parquet shard with the PNG bytes embedded (``image: {"bytes", "path"}``).
- ``chartqa``: ``test/test_human.json`` (``[{"imgname", "query", "label"}]``) + ``test/png/*.png``; type
  ``count`` (numeric answers, so the 5 % tolerance is exercised).
- ``ai2d``: a lmms-lab-style parquet shard (``question``, ``options``, ``answer`` = index string, image bytes);
  type ``shape``, the 4 shapes as options in a per-question order.
- ``videomme``: ``videomme/test-00000-of-00001.parquet`` + ``data/<videoID>.mp4``; types ``video_first`` /
  ``video_last``, 4 colour options ``"A. red"``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nemovl_trt.evaluation.metrics import LETTERS
from nemovl_trt.training.tasks import COLORS, SHAPES, Sample, generate_samples

SYNTHETIC_SEED = 9090
_TYPES = {"docvqa": ("read", "color", "shape"), "infovqa": ("read", "color"), "chartqa": ("count",),
          "ai2d": ("shape",), "videomme": ("video_first", "video_last")}


def _write_parquet(rows: list[dict], path: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # optional extra
        raise ModuleNotFoundError("writing parquet needs pyarrow: pip install 'nemovl-trt[client]'") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _options(sample: Sample, vocabulary: tuple[str, ...], k: int = 4) -> tuple[list[str], int]:
    """`k` options containing the answer, in an order fixed by the sample's index; (options, answer index)."""
    rng = np.random.default_rng([SYNTHETIC_SEED, sample.index, len(sample.qtype)])
    others = [v for v in vocabulary if v != sample.answer]
    chosen = [sample.answer, *[str(x) for x in rng.choice(others, size=k - 1, replace=False)]]
    order = rng.permutation(k)
    opts = [chosen[i] for i in order]
    return opts, opts.index(sample.answer)


def write_benchmark(fmt: str, out: Path, n: int, seed: int = SYNTHETIC_SEED) -> Path:
    """Write `n` questions of `fmt` under `out`; returns the path to give ``nemovl eval --dataset``."""
    out = Path(out)
    samples = generate_samples(n, seed=seed, split="eval", types=_TYPES[fmt])
    if fmt == "docvqa":
        rows = []
        for i, s in enumerate(samples):
            name = f"documents/{s.qtype}_{s.index:04d}.png"
            (out / "documents").mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(s.image_png())
            rows.append({"questionId": 50000 + i, "question": s.question, "question_types": ["others"],
                         "image": name, "docId": 1000 + i, "ucsf_document_id": f"syn{i:04d}",
                         "ucsf_document_page_no": "1", "answers": [s.answer, s.answer.capitalize()],
                         "data_split": "val"})
        path = out / "val_v1.0.json"
        path.write_text(json.dumps({"dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0",
                                    "data": rows}), encoding="utf-8")
        return path
    if fmt == "infovqa":
        rows = [{"questionId": 60000 + i, "question": s.question, "answers": [s.answer],
                 "answer_type": ["single span"], "image": {"bytes": s.image_png(), "path": f"{i}.png"},
                 "operation/reasoning": [], "ocr": "", "data_split": "val"} for i, s in enumerate(samples)]
        path = out / "data" / "validation-00000-of-00001.parquet"
        _write_parquet(rows, path)
        return path
    if fmt == "chartqa":
        png = out / "test" / "png"
        png.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, s in enumerate(samples):
            name = f"{700000 + i}.png"
            (png / name).write_bytes(s.image_png())
            rows.append({"imgname": name, "query": s.question, "label": s.answer})
        path = out / "test" / "test_human.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
        return path
    if fmt == "ai2d":
        rows = []
        for i, s in enumerate(samples):
            opts, idx = _options(s, SHAPES)
            rows.append({"question": s.question, "options": opts, "answer": str(idx),
                         "image": {"bytes": s.image_png(), "path": f"{i}.png"}})
        path = out / "data" / "test-00000-of-00001.parquet"
        _write_parquet(rows, path)
        return path
    if fmt == "videomme":
        (out / "data").mkdir(parents=True, exist_ok=True)
        rows = []
        for i, s in enumerate(samples):
            vid = f"syn{i:03d}"
            (out / "data" / f"{vid}.mp4").write_bytes(s.video)
            opts, idx = _options(s, tuple(COLORS))
            rows.append({"video_id": f"{i + 1:03d}", "duration": "short", "domain": "Synthetic",
                         "sub_category": s.qtype, "url": f"https://example.invalid/{vid}", "videoID": vid,
                         "question_id": f"{i + 1:03d}-1", "task_type": "Temporal Perception",
                         "question": s.question, "options": [f"{LETTERS[j]}. {o}" for j, o in enumerate(opts)],
                         "answer": LETTERS[idx]})
        path = out / "videomme" / "test-00000-of-00001.parquet"
        _write_parquet(rows, path)
        return path
    raise ValueError(f"unknown format {fmt!r}")
