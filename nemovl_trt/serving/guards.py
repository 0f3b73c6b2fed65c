"""Pure input guards for `/v1/chat/completions` and `/v1/completions`, run on the raw body before the request
reaches Triton.

Every function raises `GuardError` (an HTTP status, a message, an OpenAI error `code` and the offending
`param`) for a user mistake, so a hostile or broken body is a 4xx, never a 500:

- `decode_json_body(raw, max_depth)`: UTF-8 only (RFC 8259 §8.1; a UTF-8 BOM is skipped), standard JSON
  only (`NaN`/`Infinity` refused), nesting at most `max_depth` (checked by a linear scan *before* the
  recursive parser runs, so 100,000 levels cost a few ms and never a RecursionError), numbers the parser can
  convert (Python refuses integers over 4,300 digits).
- `check_text_encodable(body)`: every string and key must be encodable as UTF-8. JSON allows `"\\ud800"`
  (a lone UTF-16 surrogate) but it is no Unicode text; we **reject** it (400 `invalid_parameter`, naming the
  field) rather than replace it, so a client never gets an answer to a prompt it did not send.
- `check_integer_ranges(body)`: the integer fields the engine consumes, within what it accepts
  (`INTEGER_RANGES`; e.g. `seed` is a signed 64-bit integer as in OpenAI's and vLLM's API).
- `check_token_ids(body)`: token-id prompts (each of several) and `logit_bias` keys within [0, 2^31 - 1], in
  ASCII digits.
- `check_prompt_bound(body, max_seq_len, bytes_per_token)`: a prompt whose text alone needs more tokens than
  the context holds is refused before any tokenising. A tokenizer maps at most `bytes_per_token` UTF-8 bytes
  (its longest vocabulary entry, `tokenizer_bytes_per_token`) to one token, so `ceil(bytes / bytes_per_token)`
  is a lower bound on the prompt's token count; the exact count is still checked in Triton's preprocessor.
  Several prompts of one /v1/completions request are separate engine requests: each is bounded alone.

`guard_chat_body(raw, ...)` runs them all in that order and returns the decoded body.

Speed: `decode_json_body` first tries orjson (strict RFC 8259, validates UTF-8, refuses lone surrogates and
NaN) and keeps its result only when it is what `json.loads` gives (`strict_loads`); anything else goes down
the exact path above, so every refusal keeps its message. A body orjson accepted has no lone surrogate, so
`guard_chat_body` skips the encodability walk for it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # optional speed-up (wheels for x86_64 and aarch64); without it every body takes the json path
    import orjson
except ImportError:  # pragma: no cover - exercised only where orjson is absent
    orjson = None  # type: ignore[assignment]

MAX_JSON_DEPTH = 64  # arrays + objects; a request with deep tool schemas uses ~20
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
INT32_MAX = 2 ** 31 - 1
# Fallback when the tokenizer is unknown: longer than any entry of common LLM vocabularies (the tiny
# tokenizer's longest is 28 bytes); a larger value only makes the cheap bound weaker, never wrong.
DEFAULT_BYTES_PER_TOKEN = 128
# Normalizers (NFKC, replacements) can shrink text a little before tokenising; widen the bound by this.
NORMALIZER_MARGIN = 4

# field path (dots; "[]" = any list element) -> inclusive range the engine accepts.
INTEGER_RANGES: dict[str, tuple[int, int]] = {
    "seed": (INT64_MIN, INT64_MAX),
    "max_tokens": (1, INT32_MAX),
    "max_completion_tokens": (1, INT32_MAX),
    "top_k": (-1, INT32_MAX),
    "n": (1, INT32_MAX),
    "top_logprobs": (0, INT32_MAX),
    "logprobs": (0, INT32_MAX),  # an integer in /v1/completions (a boolean in chat: left alone)
    "best_of": (1, INT32_MAX),
    "media_io_kwargs.video.num_frames": (1, INT32_MAX),
    "mm_processor_kwargs.max_num_tiles": (1, INT32_MAX),
}
MEDIA_PART_TYPES = ("image_url", "video_url", "input_image")

_ESCAPE_RE = re.compile(r"\\.", re.S)
_STRING_RE = re.compile(r'"[^"]*"')
_BRACKET_RE = re.compile(r"[\[\]{}]")
_ESCAPE_RE_B = re.compile(rb"\\.", re.S)
_STRING_RE_B = re.compile(rb'"[^"]*"')
_BRACKET_RE_B = re.compile(rb"[\[\]{}]")
_OPENERS = frozenset(b"[{")
# orjson reads an integer literal beyond the 64-bit range as a float (json.loads gives an int): a float this
# large in its result may be such a literal, so that body takes the exact path.
_ORJSON_FLOAT_LIMIT = 2.0 ** 63


@dataclass
class GuardError(ValueError):
    """A request the guards refuse: HTTP `status`, OpenAI error `code` and the offending `param`."""

    status: int
    message: str
    code: str
    param: str | None = None

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error envelope."""
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param,
                          "code": self.code}}


def _invalid_json(message: str) -> GuardError:
    return GuardError(400, message, "invalid_json", None)


def json_depth_exceeds(text: str, max_depth: int) -> int | None:
    """The nesting depth reached when it goes beyond `max_depth` (None when within). Linear in the text:
    escapes and string contents are removed with regular expressions, then only the brackets are walked."""
    if text.count("[") + text.count("{") <= max_depth:
        return None  # not even that many openers in total
    stripped = _STRING_RE.sub("", _ESCAPE_RE.sub("", text))
    depth = 0
    for m in _BRACKET_RE.finditer(stripped):
        if m.group() in "[{":
            depth += 1
            if depth > max_depth:
                return depth
        else:
            depth -= 1
    return None


def _depth_exceeds_bytes(raw: bytes, max_depth: int) -> bool:
    """`json_depth_exceeds` on UTF-8 bytes (no decode needed: no byte of a multi-byte character is ASCII)."""
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return False
    stripped = _STRING_RE_B.sub(b"", _ESCAPE_RE_B.sub(b"", raw))
    depth = 0
    for m in _BRACKET_RE_B.finditer(stripped):
        if m.group()[0] in _OPENERS:
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


def _json_loads_equivalent(value: Any) -> bool:
    """False when an orjson result may differ from json.loads' (a float that may be a huge integer)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, float) and not -_ORJSON_FLOAT_LIMIT < v < _ORJSON_FLOAT_LIMIT:
            return False
    return True


def strict_loads(raw: bytes | str) -> tuple[bool, Any]:
    """(True, value) when orjson decodes `raw` to exactly what `json.loads` would (standard JSON, valid UTF-8,
    no lone surrogate, integers within 64 bits); (False, None) otherwise: the caller takes its exact path."""
    if orjson is None:
        return False, None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False, None
    return (True, value) if _json_loads_equivalent(value) else (False, None)


def _refuse_constant(name: str) -> Any:
    raise _invalid_json(f"The request body is not standard JSON: '{name}' is not a JSON number.")


def _decode_fast(raw: bytes, max_depth: int) -> tuple[bool, Any]:
    """(True, value) for a body that orjson decodes exactly and that is within `max_depth`; else (False, None)."""
    ok, value = strict_loads(raw)
    if ok and _depth_exceeds_bytes(raw, max_depth):
        return False, None  # the exact path words the refusal
    return ok, value


def decode_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Raw body bytes → the decoded JSON value, or GuardError(400, code invalid_json)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    ok, value = _decode_fast(raw, max_depth)
    if ok:
        return value
    return _decode_exact(raw, max_depth)


def _decode_exact(raw: bytes, max_depth: int) -> Any:
    """The reference decoder: json.loads after the UTF-8 check and the depth scan, each refusal worded."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _invalid_json(f"The request body is not valid UTF-8 (byte {e.start}); JSON bodies must be "
                            "UTF-8 encoded.") from None
    depth = json_depth_exceeds(text, max_depth)
    if depth is not None:
        raise _invalid_json(f"The request body nests arrays/objects more than {max_depth} levels deep.")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except GuardError:
        raise
    except json.JSONDecodeError as e:
        raise _invalid_json(f"The request body is not valid JSON: {e.msg} at position {e.pos}.") from None
    except RecursionError:  # not reached after the depth scan; kept so it can never be a 500
        raise _invalid_json("The request body nests too deeply.") from None
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise _invalid_json(f"The request body has a number that cannot be read: {str(e)[:120]}") from None


def _walk_strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """(path, string) for every string value and object key under `value`."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            key = str(k)
            yield path or "<body>", key
            yield from _walk_strings(v, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk_strings(v, f"{path}[{i}]")


def check_text_encodable(body: Any) -> None:
    """Refuse strings (and keys) that cannot be encoded as UTF-8: lone surrogates such as "\\ud800"."""
    for path, s in _walk_strings(body, ""):
        if s.isascii():
            continue
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = s[e.start]
            raise GuardError(400, f"'{path}' contains a lone UTF-16 surrogate (U+{ord(bad):04X} at character "
                                  f"{e.start}), which is not valid Unicode text; send well-formed UTF-8.",
                             "invalid_parameter", path) from None


def _get_path(body: Any, path: str) -> tuple[bool, Any]:
    cur = body
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False, None
        cur = cur[part]
    return True, cur


def _short(v: int) -> str:
    s = str(v) if abs(v) < 10 ** 60 else f"{'-' if v < 0 else ''}a {len(str(abs(v)))}-digit integer"
    return s


def check_integer_ranges(body: Any, ranges: dict[str, tuple[int, int]] | None = None) -> None:
    """Refuse integer fields outside what the engine accepts (non-integers are left to the schema check,
    which names the expected type)."""
    if not isinstance(body, dict):
        return
    for path, (lo, hi) in (ranges or INTEGER_RANGES).items():
        found, v = _get_path(body, path)
        if not found or isinstance(v, bool) or not isinstance(v, int):
            continue
        if v < lo or v > hi:
            raise GuardError(400, f"'{path}' must be an integer in [{lo}, {hi}]; got {_short(v)}.",
                             "invalid_parameter", path)


def _is_id_list(p: Any) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def _prompts(body: dict) -> list[Any]:
    """The prompts of /v1/completions, one item per engine request: `prompt` is a string, a list of token
    ids, or a list of strings / token-id lists (several prompts). Items of any other shape are kept (the
    route refuses them with its own message)."""
    p = body.get("prompt")
    if p is None:
        return []
    if isinstance(p, str) or _is_id_list(p) or not isinstance(p, list):
        return [p]
    return list(p)


def _token_id_prompts(body: dict) -> list[list[int]]:
    """Every token-id prompt of /v1/completions (a list of integers, or a list of such lists)."""
    return [p for p in _prompts(body) if _is_id_list(p)]


def check_token_ids(body: Any) -> None:
    """Token-id prompts (/v1/completions, each prompt of a list of them) and `logit_bias` keys: ids within
    [0, 2^31 - 1] written in ASCII digits, so no id overflows the engine's int32/int64 tensors or Python's
    int() limits."""
    if not isinstance(body, dict):
        return
    prompts = _prompts(body)
    for k, ids in enumerate(prompts):
        if not _is_id_list(ids):
            continue
        for i, t in enumerate(ids):
            if not 0 <= t <= INT32_MAX:
                where = f"prompt[{k}][{i}]" if len(prompts) > 1 else f"prompt[{i}]"
                raise GuardError(400, f"'{where}' must be a token id in [0, {INT32_MAX}]; got {_short(t)}.",
                                 "invalid_parameter", "prompt")
    bias = body.get("logit_bias")
    if isinstance(bias, dict):
        for k in bias:
            ok = isinstance(k, str) and 0 < len(k) <= 10 and k.isascii() and k.isdigit() and int(k) <= INT32_MAX
            if not ok:
                shown = k if len(str(k)) <= 40 else f"{str(k)[:40]}..."
                raise GuardError(400, f"'logit_bias' keys must be token ids in [0, {INT32_MAX}] written in ASCII "
                                      f"digits; got {shown!r}.", "invalid_parameter", "logit_bias")


def _text_bytes(value: Any) -> int:
    """UTF-8 bytes of every string in `value` (nested dicts / lists), media parts left out."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        if value.get("type") in MEDIA_PART_TYPES:
            return 0
        return sum(_text_bytes(v) for v in value.values())
    if isinstance(value, list):
        return sum(_text_bytes(v) for v in value)
    return 0


def prompt_text_bytes(body: Any) -> int:
    """UTF-8 bytes of the text one prompt is built from: every string in `messages` except media URLs, the
    strings of `tools`, and the largest text `prompt` of /v1/completions (each of several prompts is its
    own engine request, so each must fit alone: the bound is per prompt, not their sum). Media parts only
    add tokens, so leaving them out keeps this a lower bound."""
    if not isinstance(body, dict):
        return 0
    texts = [_text_bytes(p) for p in _prompts(body) if not _is_id_list(p)]
    return _text_bytes(body.get("messages")) + _text_bytes(body.get("tools")) + max(texts, default=0)


def min_prompt_tokens(text_bytes: int, bytes_per_token: int) -> int:
    """A lower bound on the token count of `text_bytes` bytes of text."""
    return math.ceil(text_bytes / max(1, bytes_per_token))


def check_prompt_bound(body: Any, max_seq_len: int | None, bytes_per_token: int = DEFAULT_BYTES_PER_TOKEN) -> None:
    """Refuse, without tokenising, a prompt that cannot fit: its text needs more than `max_seq_len` tokens,
    or more than `max_seq_len - max_tokens` when max tokens are asked for. With several prompts
    (/v1/completions) each is bounded alone and the largest decides. O(text bytes)."""
    if not max_seq_len or not isinstance(body, dict):
        return
    n_bytes = prompt_text_bytes(body)
    lower = min_prompt_tokens(n_bytes, bytes_per_token)
    longest_ids = max((len(ids) for ids in _token_id_prompts(body)), default=0)
    if longest_ids > lower:  # a token-id prompt longer than any text prompt's bound: it decides
        n_bytes = _text_bytes(body.get("messages")) + _text_bytes(body.get("tools"))
        lower = min_prompt_tokens(n_bytes, bytes_per_token) + longest_ids
    want = body.get("max_completion_tokens", body.get("max_tokens"))
    want = want if isinstance(want, int) and not isinstance(want, bool) and want > 0 else 0
    if lower + want > max_seq_len:
        extra = f" plus the {want} max tokens asked for" if want else ""
        param = "messages" if "messages" in body else "prompt"
        raise GuardError(400, f"The prompt's text is {n_bytes} bytes, at least {lower} tokens{extra}, which is more "
                              f"than the model's {max_seq_len}-token context.", "context_length_exceeded", param)


def guard_chat_body(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH, max_seq_len: int | None = None,
                    bytes_per_token: int = DEFAULT_BYTES_PER_TOKEN) -> Any:
    """Every guard, in order: decode (UTF-8, standard JSON, depth), encodable text, integer ranges, the
    cheap prompt-length bound. Returns the decoded body; raises GuardError."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    fast, body = _decode_fast(raw, max_depth)
    if not fast:
        body = _decode_exact(raw, max_depth)
        check_text_encodable(body)  # orjson refuses lone surrogates, json.loads does not
    check_integer_ranges(body)
    check_token_ids(body)
    check_prompt_bound(body, max_seq_len, bytes_per_token)
    return body


# ------------------------------------------------------------------------- facts about the served model
@dataclass(frozen=True)
class TokenBound:
    """How many UTF-8 bytes one token can cover at most, for `check_prompt_bound`."""

    max_token_bytes: int  # the longest vocabulary / added-token entry, in UTF-8 bytes of its stored form
    normalized: bool  # the tokenizer has a normalizer (text may shrink before tokenising)

    @property
    def bytes_per_token(self) -> int:
        return self.max_token_bytes * (NORMALIZER_MARGIN if self.normalized else 1)


def tokenizer_bytes_per_token(tokenizer_json: str | Path) -> TokenBound:
    """Read a HF `tokenizer.json` and return its longest entry. The stored form over-counts (byte-level
    'Ġ' is 2 bytes for 1, '<0x41>' 6 for 1, '▁' 3 for 1), which keeps the bound safe."""
    data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model = data.get("model") or {}
    vocab = model.get("vocab") or {}
    pieces: list[str] = list(vocab) if isinstance(vocab, dict) else [v[0] for v in vocab if v]
    pieces += [t.get("content", "") for t in data.get("added_tokens") or []]
    longest = max((len(p.encode("utf-8", "surrogatepass")) for p in pieces if isinstance(p, str)), default=0)
    if longest <= 0:
        longest = DEFAULT_BYTES_PER_TOKEN
    return TokenBound(max_token_bytes=longest, normalized=bool(data.get("normalizer")))


_PARAM_RE = re.compile(r'key:\s*"([^"]+)"\s*value\s*\{\s*string_value:\s*"((?:[^"\\]|\\.)*)"\s*\}', re.S)


def repo_model_parameters(repo: str | Path, model: str = "nemovl") -> dict[str, str]:
    """The string parameters of `<repo>/<model>/config.pbtxt` ({} when the file is missing)."""
    path = Path(repo) / model / "config.pbtxt"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    return {k: v for k, v in _PARAM_RE.findall(text)}


def repo_engines_dir(repo: str | Path, engines_dir: str | Path | None = None, model: str = "nemovl") -> Path | None:
    """The engines directory the repository's models use: `engines_dir` when given, else the model's
    `engines_dir` parameter (relative to the repository root), as the Triton models resolve it."""
    if engines_dir:
        return Path(engines_dir).resolve()
    value = repo_model_parameters(repo, model).get("engines_dir")
    if not value:
        return None
    p = Path(value)
    return (p if p.is_absolute() else Path(repo).resolve() / p).resolve()


def served_limits(repo: str | Path, engines_dir: str | Path | None = None) -> tuple[int | None, int]:
    """(max_seq_len, bytes_per_token) for a repository, read from files (no server needed)."""
    params = repo_model_parameters(repo)
    try:
        max_seq_len: int | None = int(params["max_seq_len"])
    except (KeyError, ValueError):
        max_seq_len = None
    eng = repo_engines_dir(repo, engines_dir)
    bpt = DEFAULT_BYTES_PER_TOKEN
    if eng is not None and (eng / "tokenizer" / "tokenizer.json").is_file():
        try:
            bpt = tokenizer_bytes_per_token(eng / "tokenizer" / "tokenizer.json").bytes_per_token
        except (OSError, ValueError):
            pass
    return max_seq_len, bpt
