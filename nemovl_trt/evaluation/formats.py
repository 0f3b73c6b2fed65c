"""Readers for the public files of DocVQA, InfographicVQA, ChartQA, AI2D and Video-MME, as they ship.

Accepted files (a directory means every ``*.parquet`` shard in it, sorted, or AI2D's ``questions/``):

| format | files | fields read |
|---|---|---|
| ``docvqa`` | the official ``val_v1.0*.json`` (``{"dataset_name", ..., "data": [...]}``); the Hugging Face parquet (lmms-lab/DocVQA) | ``questionId``, ``question``, ``answers`` (list), ``image`` (a path like ``documents/x.png``, or ``{"bytes", "path"}``) |
| ``infovqa`` | the official ``infographicsVQA_val_v1.0*.json``; lmms-lab/InfoVQA parquet | as DocVQA; the image is ``image_local_name`` in the official JSON |
| ``chartqa`` | the official ``test_human.json`` / ``test_augmented.json`` (``[{"imgname", "query", "label"}]``, images in ``png/`` beside it); lmms-lab/ChartQA parquet (``type``, ``question``, ``answer``, ``image``); HuggingFaceM4/ChartQA (``query``, ``label`` list, ``human_or_machine``) | |
| ``ai2d`` | lmms-lab/ai2d parquet / JSON(L) (``question``, ``options`` list, ``answer`` = index as a string, ``image``); the original release's ``questions/*.png.json`` (``imageName``, ``questions: {text: {answerTexts, correctAnswer, questionId}}``, images in ``images/``) | |
| ``videomme`` | the Video-MME parquet (``videomme/test-*.parquet``: ``question_id``, ``videoID``, ``duration``, ``domain``, ``task_type``, ``question``, ``options`` = ``["A. …", …]``, ``answer`` = letter); videos ``<videoID>.mp4`` in ``--media-root`` (or its ``data/``) | |

JSON Lines (``.jsonl``) with the same row fields works for every format. Media may be a path (relative
to ``--media-root``, else to the dataset file's folder; the folders ``png/``, ``images/``, ``data/`` and
the bare file name are tried too, then the same under the file's parent folder, as in Video-MME's
``videomme/`` + ``data/`` layout), an ``http(s)://`` or ``data:`` URL (sent as is), or embedded bytes.
"""

from __future__ import annotations

import base64
import json
import mimetypes
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS: tuple[str, ...] = ("docvqa", "infovqa", "chartqa", "ai2d", "videomme")
METRICS: dict[str, str] = {"docvqa": "anls", "infovqa": "anls", "chartqa": "relaxed_accuracy",
                           "ai2d": "accuracy", "videomme": "accuracy"}
CHOICE_FORMATS = frozenset({"ai2d", "videomme"})
PROMPT_STYLES = ("benchmark", "raw")
SHORT_ANSWER = "Answer the question using a single word or phrase."
CHOICE_ANSWER = "Answer with the option's letter from the given choices directly."
VIDEO_CHOICE_INTRO = ("Select the best answer to the following multiple-choice question based on the video. "
                      "Respond with only the letter of the correct option.")
VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv", ".webm")
_SUBDIRS = ("", "png", "images", "data", "documents")


class DatasetError(ValueError):
    """A dataset file that cannot be read as the named format; the message is one line."""


@dataclass(frozen=True)
class Media:
    """One image or video: embedded `data`, a file `path`, or a `url` sent as is."""

    kind: str  # "image" | "video"
    data: bytes | None = None
    path: Path | None = None
    url: str | None = None

    def read(self) -> bytes:
        """The media bytes (None for a URL)."""
        if self.data is not None:
            return self.data
        if self.path is not None:
            return self.path.read_bytes()
        raise ValueError("a URL media has no local bytes")

    def request_url(self) -> str:
        """What goes into ``image_url.url`` / ``video_url.url``: the URL, or a base64 data URL."""
        if self.url is not None:
            return self.url
        data = self.read()
        return f"data:{sniff_mime(data, self.kind, self.path)};base64,{base64.b64encode(data).decode('ascii')}"

    def content_part(self) -> dict[str, Any]:
        """The OpenAI chat content part carrying this media."""
        key = "video_url" if self.kind == "video" else "image_url"
        return {"type": key, key: {"url": self.request_url()}}


def sniff_mime(data: bytes, kind: str, path: Path | None = None) -> str:
    """The MIME type of media bytes from their signature (then the file suffix, then a default)."""
    head = data[:16]
    if head.startswith(b"\x89PNG"):
        return "image/png"
    if head.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"BM"):
        return "image/bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if head[4:8] == b"ftyp":
        return "video/mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "video/x-msvideo"
    if path is not None:
        guess = mimetypes.guess_type(path.name)[0]
        if guess:
            return guess
    return "video/mp4" if kind == "video" else "image/png"


@dataclass(frozen=True)
class Item:
    """One benchmark question.

    `answers`: the gold answers (DocVQA/InfoVQA: every annotator's; ChartQA: the label(s); AI2D /
    Video-MME: the gold option letter). `options`: the choices' texts (choice formats). `group`: the
    breakdown the benchmark reports (ChartQA human/augmented, Video-MME duration), or None.
    """

    fmt: str
    id: str
    question: str
    media: Media
    answers: tuple[str, ...]
    options: tuple[str, ...] = ()
    group: str | None = None

    def prompt(self, style: str = "benchmark") -> str:
        """The user text. ``benchmark``: the question with the usual instruction (short answer, or the
        lettered options and "answer with the letter"); ``raw``: the question alone."""
        from nemovl_trt.evaluation.metrics import LETTERS

        if style == "raw":
            return self.question
        if style != "benchmark":
            raise ValueError(f"unknown prompt style {style!r} (choose from {list(PROMPT_STYLES)})")
        if self.fmt not in CHOICE_FORMATS:
            return f"{self.question}\n{SHORT_ANSWER}"
        lines = [opt if self.fmt == "videomme" else f"{LETTERS[i]}. {opt}" for i, opt in enumerate(self.options)]
        if self.fmt == "videomme":
            return "\n".join([VIDEO_CHOICE_INTRO, self.question, *lines, "The best answer is:"])
        return "\n".join([self.question, *lines, CHOICE_ANSWER])


# ----------------------------------------------------------------------------------------- reading rows
def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # optional extra
        raise DatasetError(f"{path}: reading parquet needs pyarrow: pip install 'nemovl-trt[client]'") from e
    return pq.read_table(path).to_pylist()


def _read_json_file(path: Path) -> list[dict[str, Any]]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        return obj["data"]
    if isinstance(obj, dict) and isinstance(obj.get("questions"), dict):  # AI2D original, one image
        return [obj]
    raise DatasetError(f"{path}: expected a JSON list of questions or an object with a 'data' list")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def read_rows(path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every row of a dataset file or directory, each with the file it came from."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(path.glob("*.parquet")) or sorted((path / "questions").glob("*.json"))
        if not files:
            raise DatasetError(f"{path}: a directory needs *.parquet shards or AI2D's questions/*.json")
    else:
        files = [path]
    out: list[tuple[Path, dict[str, Any]]] = []
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".parquet":
            rows = _read_parquet(f)
        elif suffix == ".jsonl":
            rows = _read_jsonl(f)
        elif suffix == ".json":
            rows = _read_json_file(f)
        else:
            raise DatasetError(f"{f}: unknown file type {f.suffix!r} (.json, .jsonl or .parquet)")
        for row in rows:
            if not isinstance(row, dict):
                raise DatasetError(f"{f}: every row must be an object, got {type(row).__name__}")
            out.append((f, row))
    return out


# ---------------------------------------------------------------------------------------------- media
def _candidates(value: str, roots: Iterable[Path]) -> list[Path]:
    rel = Path(value)
    if rel.is_absolute():
        return [rel]
    out: list[Path] = []
    for root in roots:
        for sub in _SUBDIRS:
            base = root / sub if sub else root
            for r in (rel, Path(rel.name)):
                p = base / r
                if p not in out:
                    out.append(p)
    return out


def resolve_media(value: Any, kind: str, roots: list[Path], where: str) -> Media:
    """A row's image/video value (bytes, ``{"bytes", "path"}``, URL or path) as `Media`."""
    if isinstance(value, dict):  # the Hugging Face Image feature
        if value.get("bytes"):
            return Media(kind, data=bytes(value["bytes"]))
        value = value.get("path")
    if isinstance(value, bytes | bytearray | memoryview):
        return Media(kind, data=bytes(value))
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: no {kind} (expected a path, a URL or embedded bytes)")
    if value.startswith(("http://", "https://", "data:")):
        return Media(kind, url=value)
    tried = _candidates(value, roots)
    for p in tried:
        if p.is_file():
            return Media(kind, path=p)
    raise DatasetError(f"{where}: {kind} {value!r} not found (tried {', '.join(map(str, tried[:4]))}, ...); "
                       f"give its folder with --media-root")


# ----------------------------------------------------------------------------------------- per format
def _where(f: Path, i: int) -> str:
    return f"{f.name} row {i}"


def _need(row: dict[str, Any], keys: tuple[str, ...], where: str) -> Any:
    for k in keys:
        if row.get(k) not in (None, ""):
            return row[k]
    raise DatasetError(f"{where}: missing field {' / '.join(repr(k) for k in keys)}")


def _str_answers(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        answers = tuple(str(a) for a in value)
    elif value is None:
        answers = ()
    else:
        answers = (str(value),)
    if not answers:
        raise DatasetError(f"{where}: no ground-truth answers (a test split? its answers are withheld: "
                           f"submit to the benchmark's server)")
    return answers


def _docvqa(f: Path, i: int, row: dict[str, Any], roots: list[Path], fmt: str) -> Item:
    where = _where(f, i)
    question = str(_need(row, ("question",), where))
    answers = _str_answers(row.get("answers"), where)
    media = resolve_media(_need(row, ("image", "image_local_name"), where), "image", roots, where)
    return Item(fmt, str(row.get("questionId", i)), question, media, answers)


def _chartqa(f: Path, i: int, row: dict[str, Any], roots: list[Path]) -> Item:
    where = _where(f, i)
    question = str(_need(row, ("question", "query"), where))
    answers = _str_answers(row.get("answer", row.get("label")), where)
    media = resolve_media(_need(row, ("image", "imgname"), where), "image", roots, where)
    group = row.get("type")
    if group is None and "human_or_machine" in row:
        group = "human" if int(row["human_or_machine"]) == 0 else "augmented"
    if group is None:
        stem = f.stem.lower()
        group = "human" if "human" in stem else "augmented" if "augmented" in stem else None
    elif isinstance(group, str):
        group = group.removesuffix("_test")
    return Item("chartqa", str(row.get("id", row.get("imgname", i))), question, media, answers, group=group)


def _choice_letter(value: Any, n_options: int, where: str) -> str:
    from nemovl_trt.evaluation.metrics import LETTERS

    s = str(value).strip()
    if s.isdigit():
        idx = int(s)
    elif len(s) == 1 and s.upper() in LETTERS:
        idx = LETTERS.index(s.upper())
    else:
        raise DatasetError(f"{where}: answer {value!r} is neither an option index nor a letter")
    if not 0 <= idx < n_options:
        raise DatasetError(f"{where}: answer {value!r} is outside the {n_options} options")
    return LETTERS[idx]


def _ai2d_rows(f: Path, i: int, row: dict[str, Any], roots: list[Path]) -> list[Item]:
    where = _where(f, i)
    if isinstance(row.get("questions"), dict):  # the original release: one file per image
        image_name = str(_need(row, ("imageName",), where))
        media = resolve_media(image_name, "image", roots, where)
        items = []
        for text, q in row["questions"].items():
            options = tuple(str(o) for o in q["answerTexts"])
            letter = _choice_letter(q["correctAnswer"], len(options), where)
            items.append(Item("ai2d", str(q.get("questionId", f"{image_name}-{len(items)}")), str(text), media,
                              (letter,), options))
        return items
    options = _need(row, ("options",), where)
    if not isinstance(options, list | tuple) or len(options) < 2:
        raise DatasetError(f"{where}: 'options' must be a list of at least 2 choices")
    options = tuple(str(o) for o in options)
    letter = _choice_letter(_need(row, ("answer",), where), len(options), where)
    media = resolve_media(_need(row, ("image",), where), "image", roots, where)
    return [Item("ai2d", str(row.get("id", row.get("question_id", i))), str(_need(row, ("question",), where)),
                 media, (letter,), options)]


def _videomme(f: Path, i: int, row: dict[str, Any], roots: list[Path]) -> Item:
    where = _where(f, i)
    options = _need(row, ("options",), where)
    if not isinstance(options, list | tuple) or len(options) < 2:
        raise DatasetError(f"{where}: 'options' must be a list of at least 2 choices")
    options = tuple(str(o) for o in options)
    letter = _choice_letter(_need(row, ("answer",), where), len(options), where)
    if row.get("video") not in (None, ""):
        media = resolve_media(row["video"], "video", roots, where)
    else:
        vid = str(_need(row, ("videoID", "video_id"), where))
        media = None
        for suffix in VIDEO_SUFFIXES:
            try:
                media = resolve_media(vid + suffix, "video", roots, where)
                break
            except DatasetError:
                continue
        if media is None:
            raise DatasetError(f"{where}: video {vid}.mp4 not found under {', '.join(map(str, roots))} "
                               f"(or their data/); give its folder with --media-root")
    return Item("videomme", str(row.get("question_id", i)), str(_need(row, ("question",), where)), media,
                (letter,), options, group=row.get("duration"))


def load_dataset(path: Path | str, fmt: str, media_root: Path | str | None = None,
                 limit: int | None = None) -> list[Item]:
    """Read a dataset file (or directory) of format `fmt` into `Item`s, in file order.

    Raises `DatasetError` with one line naming the file and row when a field is missing or a media file
    cannot be found.
    """
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    items: list[Item] = []
    for i, (f, row) in enumerate(read_rows(Path(path))):
        roots = ([Path(media_root)] if media_root is not None else []) + [f.parent, f.parent.parent]
        if fmt in ("docvqa", "infovqa"):
            items.append(_docvqa(f, i, row, roots, fmt))
        elif fmt == "chartqa":
            items.append(_chartqa(f, i, row, roots))
        elif fmt == "ai2d":
            items.extend(_ai2d_rows(f, i, row, roots))
        else:
            items.append(_videomme(f, i, row, roots))
        if limit is not None and len(items) >= limit:
            return items[:limit]
    if not items:
        raise DatasetError(f"{path}: no questions")
    return items
