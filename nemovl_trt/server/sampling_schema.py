"""The sampling fields chat and completions share (docs/api.md "Sampling"): validated into the `params`
JSON of the `nemovl` entry model. Only values that change the result are sent (0 penalties, n = 1, ... are
left out), so an old-style request sends the same params as before."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemovl_trt.server.errors import APIError, invalid
from nemovl_trt.server.fields import boolean, integer, is_num, number

MAX_N = 8  # choices per request (the cpu engine's batch is 8 sequences)
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
LOGIT_BIAS_LIMIT = 100
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's cap
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 63 - 1  # OpenAI's seed is an int64


@dataclass(frozen=True)
class Limits:
    """What the sampling validation needs of the served model."""

    max_seq_len: int | None


@dataclass
class Sampling:
    """What the response shaping needs to know: choices and logprobs."""

    n: int = 1
    best_of: int = 1  # completions: candidates per prompt, the n likeliest returned (best_of >= n)
    logprobs: int | None = None  # None: off; k: alternatives per token
    stream: bool = False
    include_usage: bool = False


def _logit_bias(body: dict[str, Any]) -> dict[str, float] | None:
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise invalid("'logit_bias' must be an object mapping token ids to biases.", "logit_bias")
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise invalid(f"'logit_bias' accepts at most {MAX_LOGIT_BIAS_ENTRIES} tokens.", "logit_bias")
    out: dict[str, float] = {}
    for k, v in bias.items():
        if not (isinstance(k, str) and k.isdigit()):
            raise invalid(f"'logit_bias' keys must be token ids (non-negative integers); got {k!r}.", "logit_bias")
        if not is_num(v) or not -LOGIT_BIAS_LIMIT <= v <= LOGIT_BIAS_LIMIT:
            raise invalid(f"'logit_bias' values must be numbers in [-100, 100]; got {v!r} for token {k}.",
                          "logit_bias")
        out[str(int(k))] = float(v)
    return out or None


def _max_tokens(body: dict[str, Any], limits: Limits, params: dict[str, Any]) -> None:
    max_tokens = integer(body, "max_tokens", 1)
    mct = integer(body, "max_completion_tokens", 1)
    if mct is not None:
        max_tokens = mct
    if max_tokens is not None:
        if limits.max_seq_len is not None and max_tokens >= limits.max_seq_len:
            raise APIError(400, f"max_tokens ({max_tokens}) leaves no room for the prompt in the "
                                f"{limits.max_seq_len}-token context.", code="context_length_exceeded",
                           param="max_completion_tokens" if mct is not None else "max_tokens")
        params["max_tokens"] = max_tokens


def _stop(body: dict[str, Any], params: dict[str, Any]) -> None:
    stop = body.get("stop")
    if stop is None:
        return
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise invalid("'stop' must be a non-empty string or a list of non-empty strings.", "stop")
    if len(stop) > MAX_STOP:
        raise invalid(f"'stop' accepts at most {MAX_STOP} strings.", "stop")
    if stop:
        params["stop"] = stop


def _stream(body: dict[str, Any], out: Sampling) -> None:
    out.stream = boolean(body, "stream") or False
    so = body.get("stream_options")
    if so is not None:
        if not out.stream:
            raise invalid("'stream_options' is only allowed when 'stream' is true.", "stream_options")
        if not isinstance(so, dict):
            raise invalid("'stream_options' must be an object.", "stream_options")
        out.include_usage = bool(boolean(so, "include_usage", "stream_options.include_usage"))


def parse_sampling(body: dict[str, Any], limits: Limits, params: dict[str, Any], *, chat: bool) -> Sampling:
    """Validate the sampling fields of `body` into `params` (nemovl `params` JSON). `chat` selects how
    logprobs are asked for: chat `logprobs: bool` + `top_logprobs: 0..20`; completions `logprobs: 0..20`."""
    out = Sampling()
    t = number(body, "temperature", 0.0, 2.0)
    if t is not None:
        params["temperature"] = t
    tp = number(body, "top_p", 0.0, 1.0, lo_open=True)
    if tp is not None:
        params["top_p"] = tp
    tk = integer(body, "top_k", -1)
    if tk is not None:
        params["top_k"] = max(tk, 0)  # -1 and 0 both mean "off"
    seed = integer(body, "seed", SEED_MIN, SEED_MAX)
    if seed is not None:
        params["seed"] = seed
    for pen in ("frequency_penalty", "presence_penalty"):
        v = number(body, pen, -2.0, 2.0)
        if v:
            params[pen] = v
    rp = number(body, "repetition_penalty", 0.0, 2.0 ** 31, lo_open=True)
    if rp is not None and rp != 1.0:
        params["repetition_penalty"] = rp
    bias = _logit_bias(body)
    if bias:
        params["logit_bias"] = bias
    _max_tokens(body, limits, params)
    _stop(body, params)
    if boolean(body, "ignore_eos"):
        params["ignore_eos"] = True
    n = integer(body, "n", 1, MAX_N)
    out.n = n or 1
    if out.n > 1:
        params["n"] = out.n
    if chat:
        logprobs = boolean(body, "logprobs")
        top = integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top and not logprobs:
            raise invalid("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
        if logprobs:
            out.logprobs = top or 0
    else:
        out.logprobs = integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
        best_of = integer(body, "best_of", 1, MAX_N)
        if best_of is not None and best_of < out.n:
            raise invalid(f"'best_of' ({best_of}) must be greater than or equal to 'n' ({out.n}).", "best_of")
        out.best_of = best_of or out.n
    if out.logprobs is not None:
        params["logprobs"] = out.logprobs
    _stream(body, out)
    if out.best_of > out.n:
        if out.stream:
            raise invalid("'best_of' cannot be used with 'stream': the best completions are known only at the "
                          "end.", "best_of")
        # the engine generates best_of candidates; the frontend keeps the n with the highest cumulative
        # logprob, so it needs the chosen tokens' logprobs even when the client did not ask for them
        params["n"] = out.best_of
        params.setdefault("logprobs", 0)
    return out
