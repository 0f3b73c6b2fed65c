"""Benchmark formats and metrics (no server): every metric against hand-computed cases, every reader on
files written here in the benchmark's own layout, and the HTTP runner against a stub endpoint."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from nemovl_trt.evaluation import metrics
from nemovl_trt.evaluation.formats import DatasetError, Item, Media, load_dataset, sniff_mime
from nemovl_trt.evaluation.runner import evaluate_items, score_item


def png(color=(200, 10, 10), size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ metrics
def test_levenshtein_hand_cases():
    assert metrics.levenshtein("kitten", "sitting") == 3
    assert metrics.levenshtein("", "abc") == 3
    assert metrics.levenshtein("flaw", "lawn") == 2
    assert metrics.levenshtein("same", "same") == 0


@pytest.mark.parametrize("pred, answers, expected", [
    ("cat", ["cat"], 1.0),
    ("  Cat ", ["cat"], 1.0),  # lower-cased and stripped
    ("new  york", ["New York"], 1.0),  # whitespace runs collapsed
    ("cats", ["cat"], 0.75),  # 1 edit / 4 chars
    ("abc", ["abcd"], 0.75),
    ("ab", ["abcd"], 0.0),  # NL = 2/4 = 0.5 is not < 0.5
    ("abcde", ["abcdefghij"], 0.0),  # NL = 0.5 again
    ("abcdef", ["abcdefghij"], 0.6),  # NL = 4/10
    ("dog", ["cat"], 0.0),
    ("", ["cat"], 0.0),
    ("1987", ["1986", "the year 1987"], 0.75),  # max over answers: 1 - 1/4; the other is 9/13 → 0
    ("the year 1987", ["1986", "the year 1987"], 1.0),
])
def test_anls_hand_cases(pred, answers, expected):
    assert metrics.anls(pred, answers) == pytest.approx(expected)


def test_anls_needs_answers():
    with pytest.raises(ValueError):
        metrics.anls("x", [])


@pytest.mark.parametrize("pred, gold, ok", [
    ("104", "100", True),  # 4 %
    ("105", "100", True),  # exactly 5 %
    ("106", "100", False),  # 6 %
    ("95", "100", True),
    ("94.9", "100", False),
    ("0.5", "50%", True),  # 50 % = 0.5
    ("52%", "0.5", True),  # 0.52 vs 0.5 = 4 %
    ("55%", "0.5", False),  # 10 %
    ("0", "0", True),  # gold 0: exact string match
    ("0.0", "0", False),
    ("Yes", "yes", True),  # non-numeric: case-insensitive exact
    ("France", "Germany", False),
    ("12 million", "12", False),  # not a number → exact match fails
])
def test_relaxed_correctness_hand_cases(pred, gold, ok):
    assert metrics.relaxed_correct(pred, gold) is ok


def test_relaxed_accuracy_takes_any_label():
    assert metrics.relaxed_accuracy("21", ["20", "abc"]) == 1.0  # 5 % of 20 = 1
    assert metrics.relaxed_accuracy("22", ["20", "abc"]) == 0.0


OPTS = ("circle", "square", "triangle", "diamond")


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("B.", "B"), ("(C)", "C"), ("D) diamond", "D"), ("The answer is C.", "C"),
    ("Answer: A", "A"), ("triangle", "C"), ("Diamond.", "D"), ("E", None), ("a circle", None),
    ("I think option B is right", "B"), ("", None),
])
def test_extract_choice_hand_cases(text, letter):
    assert metrics.extract_choice(text, OPTS) == letter


def test_extract_choice_with_lettered_options():
    opts = ("A. red", "B. green", "C. blue", "D. yellow")
    assert metrics.extract_choice("blue", opts) == "C"
    assert metrics.extract_choice("B. green", opts) == "B"
    assert metrics.exact_choice("C", "C", opts) == 1.0
    assert metrics.exact_choice("yellow", "C", opts) == 0.0


def test_wilson_interval_hand_values():
    lo, hi = metrics.wilson_interval(8, 10)
    # p = 0.8, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.71682, half 0.23720 → [0.4902, 0.9433]
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert metrics.wilson_interval(0, 0) == (0.0, 0.0)
    lo, hi = metrics.mean_interval([1.0, 0.5, 0.0])  # mean 0.5, sd 0.5 → half 1.96·0.5/√3 = 0.5658
    assert lo == 0.0 and hi == pytest.approx(1.0)
    lo, hi = metrics.mean_interval([0.6, 0.8, 0.7, 0.9])  # mean 0.75, sd 0.1291 → half 0.12652
    assert lo == pytest.approx(0.6235, abs=1e-3) and hi == pytest.approx(0.8765, abs=1e-3)


# ------------------------------------------------------------------------------------------ readers
def test_docvqa_official_json(tmp_path: Path):
    (tmp_path / "documents").mkdir()
    (tmp_path / "documents" / "pybv0228_81.png").write_bytes(png())
    (tmp_path / "val_v1.0_withQT.json").write_text(json.dumps({
        "dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0",
        "data": [{"questionId": 49153, "question": "What is the ‘actual’ value per 1000, during the year 1975?",
                  "question_types": ["figure/diagram"], "image": "documents/pybv0228_81.png", "docId": 14465,
                  "ucsf_document_id": "pybv0228", "ucsf_document_page_no": "81", "answers": ["0.28"],
                  "data_split": "val"}]}))
    (item,) = load_dataset(tmp_path / "val_v1.0_withQT.json", "docvqa")
    assert item.id == "49153" and item.answers == ("0.28",)
    assert item.media.path == tmp_path / "documents" / "pybv0228_81.png"
    assert item.prompt() == ("What is the ‘actual’ value per 1000, during the year 1975?\n"
                             "Answer the question using a single word or phrase.")
    assert item.prompt("raw") == "What is the ‘actual’ value per 1000, during the year 1975?"


def test_docvqa_test_split_without_answers_is_refused(tmp_path: Path):
    f = tmp_path / "test_v1.0.json"
    f.write_text(json.dumps({"data": [{"questionId": 1, "question": "q", "image": "x.png"}]}))
    with pytest.raises(DatasetError, match="no ground-truth answers"):
        load_dataset(f, "docvqa")


def test_infovqa_official_json_uses_image_local_name(tmp_path: Path):
    (tmp_path / "infographicsvqa_images").mkdir()
    (tmp_path / "infographicsvqa_images" / "10002.jpeg").write_bytes(b"\xff\xd8\xff\xe0fake")
    f = tmp_path / "infographicsVQA_val_v1.0_withQT.json"
    f.write_text(json.dumps({"dataset_name": "infographicVQA", "data": [
        {"questionId": 65718, "question": "What percentage?", "image_local_name": "10002.jpeg",
         "answers": ["13%", "13 %"], "answer_type": ["single span"]}]}))
    (item,) = load_dataset(f, "infovqa", media_root=tmp_path / "infographicsvqa_images")
    assert item.answers == ("13%", "13 %") and item.media.path.name == "10002.jpeg"
    assert item.media.request_url().startswith("data:image/jpeg;base64,")


def test_missing_media_names_the_row_and_suggests_media_root(tmp_path: Path):
    f = tmp_path / "val.json"
    f.write_text(json.dumps({"data": [{"questionId": 1, "question": "q", "image": "documents/none.png",
                                       "answers": ["a"]}]}))
    with pytest.raises(DatasetError, match=r"val\.json row 0: image 'documents/none\.png' not found.*--media-root"):
        load_dataset(f, "docvqa")


def test_chartqa_official_json_with_png_folder(tmp_path: Path):
    test = tmp_path / "ChartQA Dataset" / "test"
    (test / "png").mkdir(parents=True)
    (test / "png" / "41699051005347.png").write_bytes(png())
    (test / "test_augmented.json").write_text(json.dumps([
        {"imgname": "41699051005347.png", "query": "How many food item is shown in the bar graph?", "label": "14"}]))
    (item,) = load_dataset(test / "test_augmented.json", "chartqa")
    assert item.answers == ("14",) and item.group == "augmented"
    assert item.media.path == test / "png" / "41699051005347.png"
    assert score_item(item, "14.5") == 1.0 and score_item(item, "15") == 0.0  # 3.6 % / 7.1 %


def test_chartqa_lmms_lab_jsonl_and_hf_m4_labels(tmp_path: Path):
    f = tmp_path / "chartqa.jsonl"
    rows = [{"type": "human_test", "question": "What is the value?", "answer": "0.57",
             "image": "data:image/png;base64,AAAA"},
            {"query": "Which is larger?", "label": ["Asia"], "human_or_machine": 1, "image": "data:image/png;base64,AAAA"}]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    a, b = load_dataset(f, "chartqa")
    assert (a.group, a.answers, a.media.url) == ("human", ("0.57",), "data:image/png;base64,AAAA")
    assert (b.group, b.answers, b.question) == ("augmented", ("Asia",), "Which is larger?")


def test_parquet_with_embedded_image_bytes(tmp_path: Path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    img = png((10, 200, 10))
    rows = [{"question": "Which part is the leaf?", "options": ["stem", "leaf", "root", "flower"], "answer": "1",
             "image": {"bytes": img, "path": "1.png"}}]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "test-00000-of-00001.parquet")
    (item,) = load_dataset(tmp_path / "data", "ai2d")  # a folder of shards
    assert item.answers == ("B",) and item.options == ("stem", "leaf", "root", "flower")
    assert item.media.read() == img and item.media.request_url().startswith("data:image/png;base64,")
    assert item.prompt().splitlines() == ["Which part is the leaf?", "A. stem", "B. leaf", "C. root", "D. flower",
                                          "Answer with the option's letter from the given choices directly."]
    assert score_item(item, "B") == 1.0 and score_item(item, "leaf") == 1.0 and score_item(item, "A") == 0.0


def test_ai2d_original_release_layout(tmp_path: Path):
    (tmp_path / "images").mkdir()
    (tmp_path / "questions").mkdir()
    (tmp_path / "images" / "0.png").write_bytes(png())
    (tmp_path / "questions" / "0.png.json").write_text(json.dumps({"imageName": "0.png", "questions": {
        "Which stage is the egg?": {"abcLabel": False, "answerTexts": ["A", "B", "C", "D"], "correctAnswer": 2,
                                    "questionId": "0.png-0"},
        "How many stages?": {"abcLabel": False, "answerTexts": ["3", "4", "5", "6"], "correctAnswer": 1,
                             "questionId": "0.png-1"}}}))
    items = load_dataset(tmp_path, "ai2d")
    assert [(i.id, i.answers) for i in items] == [("0.png-0", ("C",)), ("0.png-1", ("B",))]
    assert items[0].media.path == tmp_path / "images" / "0.png"


def test_ai2d_answer_out_of_range_is_refused(tmp_path: Path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"question": "q", "options": ["x", "y"], "answer": "2", "image": "data:,"}))
    with pytest.raises(DatasetError, match="outside the 2 options"):
        load_dataset(f, "ai2d")


def test_videomme_parquet_layout_and_group(tmp_path: Path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "fFjv93ACGo8.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42fake")
    (tmp_path / "videomme").mkdir()
    rows = [{"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
             "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8",
             "question_id": "001-1", "task_type": "Counting Problem",
             "question": "When demonstrating the Germany modern Christmas tree is initially decorated with apples, "
                         "candles and berries, which kind of the decoration has the largest number?",
             "options": ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."],
             "answer": "C"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "videomme" / "test-00000-of-00001.parquet")
    (item,) = load_dataset(tmp_path / "videomme" / "test-00000-of-00001.parquet", "videomme")
    assert (item.id, item.group, item.answers) == ("001-1", "short", ("C",))
    assert item.media.kind == "video" and item.media.path == tmp_path / "data" / "fFjv93ACGo8.mp4"
    assert item.media.content_part()["type"] == "video_url"
    assert item.media.request_url().startswith("data:video/mp4;base64,")
    lines = item.prompt().splitlines()
    assert lines[2:6] == rows[0]["options"] and lines[-1] == "The best answer is:"
    assert score_item(item, "C") == 1.0 and score_item(item, "Berries") == 1.0 and score_item(item, "B") == 0.0


def test_unknown_file_type_and_format(tmp_path: Path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DatasetError, match="unknown file type"):
        load_dataset(tmp_path / "x.csv", "docvqa")
    with pytest.raises(DatasetError, match="unknown format"):
        load_dataset(tmp_path / "x.csv", "mmmu")


def test_sniff_mime():
    assert sniff_mime(png(), "image") == "image/png"
    assert sniff_mime(b"\xff\xd8\xff", "image") == "image/jpeg"
    assert sniff_mime(b"\x00\x00\x00\x18ftypisom", "video") == "video/mp4"
    assert sniff_mime(b"\x1a\x45\xdf\xa3", "video") == "video/webm"


# ------------------------------------------------------------------------------------ runner (stub)
class _Stub:
    """A minimal OpenAI-compatible endpoint: answers by a table keyed on the question text."""

    def __init__(self, answers: dict[str, str], fail: dict[str, int] | None = None, key: str | None = None):
        self.answers, self.fail, self.key = answers, dict(fail or {}), key
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        stub = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj, headers=()):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                self._send(200, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.bodies.append(body)
                stub.auth.append(self.headers.get("Authorization"))
                text = body["messages"][-1]["content"][1]["text"].splitlines()[0]
                if stub.fail.get(text):
                    stub.fail[text] -= 1
                    self._send(503, {"error": {"message": "busy", "code": "model_not_ready"}}, [("Retry-After", "0")])
                    return
                if text not in stub.answers:
                    self._send(400, {"error": {"message": f"bad question {text}", "code": "invalid_parameter"}})
                    return
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant",
                                                                      "content": stub.answers[text]}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _doc_item(i: int, q: str, answers: tuple[str, ...]) -> Item:
    return Item("docvqa", str(i), q, Media("image", data=png()), answers)


def test_runner_scores_anls_and_records_errors():
    stub = _Stub({"q0": "cat", "q1": "cats", "q2": "<think>hmm</think> dog", "q3": "x"}, fail={"q3": 1})
    try:
        items = [_doc_item(0, "q0", ("cat",)), _doc_item(1, "q1", ("cat",)), _doc_item(2, "q2", ("cat",)),
                 _doc_item(3, "q3", ("x",)), _doc_item(4, "q4", ("y",))]
        res = evaluate_items(items, stub.url, concurrency=2, api_key="k1", extra_body={"top_k": 1},
                             progress=False)
    finally:
        stub.close()
    # per question: 1, 0.75 (1/4 edits), 0 ("dog"), 1 (after one 503 retried), 0 (HTTP 400)
    assert [p.score for p in res.predictions] == [1.0, 0.75, 0.0, 1.0, 0.0]
    assert res.score == pytest.approx(2.75 / 5)
    assert res.predictions[2].prediction == "dog"
    assert res.errors == 1 and res.predictions[4].error == "HTTP 400: bad question q4"
    assert res.model == "stub-model" and res.metric == "anls" and res.n == 5
    assert len(stub.bodies) == 6  # q3 asked twice
    assert set(stub.auth) == {"Bearer k1"}
    b = stub.bodies[0]
    assert b["model"] == "stub-model" and b["temperature"] == 0.0 and b["top_k"] == 1 and b["max_tokens"] == 32
    assert b["messages"][0] == {"role": "system", "content": "/no_think"}
    assert b["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    out = res.to_json()
    assert set(out) == {"format", "metric", "model", "endpoint", "n", "score", "ci95", "errors", "groups", "wall_s"}


def test_runner_unreachable_endpoint():
    from nemovl_trt.evaluation.runner import EndpointError

    with pytest.raises(EndpointError, match="cannot reach"):
        evaluate_items([_doc_item(0, "q", ("a",))], "http://127.0.0.1:9", progress=False)


def test_eval_command_dataset_mode_against_the_stub(tmp_path: Path):
    from nemovl_trt.training.commands import eval_cmd

    test = tmp_path / "test"
    (test / "png").mkdir(parents=True)
    rows = []
    for i, label in enumerate(["10", "200", "Asia", "0.5"]):
        (test / "png" / f"{i}.png").write_bytes(png())
        rows.append({"imgname": f"{i}.png", "query": f"c{i}", "label": label})
    (test / "test_human.json").write_text(json.dumps(rows))
    stub = _Stub({"c0": "10.4", "c1": "189", "c2": "asia", "c3": "50%"})
    try:
        preds = tmp_path / "p.jsonl"
        res = CliRunner().invoke(eval_cmd, ["--server", stub.url, "--dataset", str(test / "test_human.json"),
                                            "--format", "chartqa", "--json", "--no-progress",
                                            "--predictions", str(preds), "--system", "",
                                            "--extra-body", '{"seed": 3}', "--max-num-tiles", "2"])
    finally:
        stub.close()
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    # 10.4 vs 10: 4 % ok; 189 vs 200: 5.5 % wrong; asia = Asia; 50 % = 0.5 → 3/4
    assert out["score"] == pytest.approx(0.75) and out["metric"] == "relaxed_accuracy"
    assert out["groups"] == {"human": {"n": 4, "score": 0.75}}
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert [x["score"] for x in lines] == [1.0, 0.0, 1.0, 1.0]
    assert stub.bodies[0]["seed"] == 3 and stub.bodies[0]["mm_processor_kwargs"] == {"max_num_tiles": 2}
    assert stub.bodies[0]["messages"][0]["role"] == "user"  # --system '' sends no system message


def test_eval_command_dataset_errors_are_one_line(tmp_path: Path):
    from nemovl_trt.training.commands import eval_cmd

    f = tmp_path / "v.json"
    f.write_text(json.dumps({"data": [{"questionId": 1, "question": "q", "image": "none.png", "answers": ["a"]}]}))
    res = CliRunner().invoke(eval_cmd, ["--dataset", str(f), "--format", "docvqa"])
    assert res.exit_code == 1 and "not found" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(eval_cmd, ["--dataset", str(f)])
    assert res.exit_code == 2 and "--dataset and --format go together" in res.output
