"""The whole OpenAI sampling surface through the real stack (tritonserver + the frontend), with the openai SDK
and LangChain as clients: structured output (random pydantic schemas, with an image, streamed and not, the
random-weight and the trained tiny checkpoint), forced tool calls, logprobs against the reference model's own
softmax, n choices, penalties, logit_bias, stop strings split across tokens, seeds (negative ones too),
/v1/completions with several prompts (choices indexed prompt-major) and best_of."""

from __future__ import annotations

import functools
import json
import random
import typing
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import httpx
import openai
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from tests.fixtures_server import ApiServer
from tests.test_server_openai import b64, image_part, png_bytes, user

pytestmark = pytest.mark.integration

TRAINED = Path(__file__).resolve().parent.parent / "data" / "tiny-trained"
N_SCHEMAS = 20
N_STREAMED = 6


# ---------------------------------------------------------------- random schemas
@functools.cache
def random_model(seed: int) -> type[BaseModel]:
    """A random pydantic model: nested objects, arrays, enums, bounded numbers, required and optional
    fields (strings and arrays bounded so a random-weight model finishes)."""
    rng = random.Random(seed)

    def leaf(depth: int) -> Any:
        kind = rng.choice(["str", "int", "float", "bool", "enum", "literal", "list", "nested", "optional"]
                          if depth < 2 else ["str", "int", "float", "bool", "enum"])
        if kind == "str":
            return Annotated[str, Field(max_length=rng.randint(1, 6))]
        if kind == "int":
            lo = rng.randint(-50, 10)
            return Annotated[int, Field(ge=lo, le=lo + rng.randint(1, 500))]
        if kind == "float":
            # multipleOf bounds the digits: a plain JSON number may have any number of decimals, and a
            # model that likes digits never stops writing them (docs/api.md "Structured output")
            return Annotated[float, Field(ge=0, le=rng.choice([1, 10, 100]), multiple_of=0.01)]
        if kind == "bool":
            return bool
        if kind == "enum":
            return Enum(f"E{seed}_{rng.randint(0, 10**6)}", {f"v{i}": f"opt{i}" for i in range(rng.randint(2, 4))})
        if kind == "literal":
            return Literal["red", "green", "blue"]
        if kind == "list":
            return Annotated[list[leaf(depth + 1)], Field(max_length=rng.randint(1, 3))]
        if kind == "nested":
            return model(depth + 1)
        return Optional[leaf(depth + 1)]  # noqa: UP045 - pydantic field type built at run time

    def model(depth: int) -> type[BaseModel]:
        fields = {}
        for i in range(rng.randint(1, 4 if depth == 0 else 2)):
            typ = leaf(depth)
            fields[f"f{i}"] = (typ, None if type(None) in typing.get_args(typ) else ...)
        return create_model(f"M{seed}_{depth}_{rng.randint(0, 10**6)}", __config__=ConfigDict(extra="forbid"),
                            **fields)

    return model(0)


def _image_msgs(text: str) -> list[dict[str, Any]]:
    return user(image_part("data:image/png;base64," + b64(png_bytes(64, 48))), text)


@pytest.fixture(scope="module")
def sdk(api_server: ApiServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_server.base_url, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def trained_sdk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """The served stack on the trained checkpoint (data/tiny-trained)."""
    from nemovl_trt import demo

    work = tmp_path_factory.mktemp("trained_sampling")
    engines, repo = demo.build(TRAINED, work, log=lambda _: None)
    with demo.serve(repo, engines, log=lambda _: None) as base:
        yield openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)


def _parse_all(client: openai.OpenAI, model: str, seeds: range) -> list[tuple[int, Any, str]]:
    """`chat.completions.parse` with a random model for each seed, 4 at a time (batched in the engine)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(seed: int) -> tuple[int, Any, str]:
        cls = random_model(seed)
        r = client.chat.completions.parse(model=model, messages=_image_msgs("Describe the image as JSON."),
                                          response_format=cls, temperature=1.0, seed=seed, max_tokens=600)
        return seed, r.choices[0].message.parsed, r.choices[0].message.content or ""

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, seeds))


def _check_parsed(results: list[tuple[int, Any, str]]) -> None:
    for seed, parsed, content in results:
        cls = random_model(seed)
        assert isinstance(parsed, cls), (seed, content)
        assert cls.model_validate_json(content) == parsed


def test_parse_random_schemas_random_weights(api_server: ApiServer, sdk: openai.OpenAI) -> None:
    _check_parsed(_parse_all(sdk, api_server.model, range(N_SCHEMAS)))


def test_parse_random_schemas_trained_checkpoint(trained_sdk: openai.OpenAI) -> None:
    _check_parsed(_parse_all(trained_sdk, "nvidia/nemotron-nano-12b-v2-vl", range(100, 100 + N_SCHEMAS)))


def test_structured_output_streamed_equals_not_streamed(api_server: ApiServer, sdk: openai.OpenAI) -> None:
    from openai.lib._parsing._completions import type_to_response_format_param

    for seed in range(200, 200 + N_STREAMED):
        cls = random_model(seed)
        kw = {"model": api_server.model, "messages": _image_msgs("JSON please."), "temperature": 1.0, "seed": seed,
              "response_format": type_to_response_format_param(cls)}
        chunks = list(sdk.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        cls.model_validate_json(text)
        full = sdk.chat.completions.create(**kw)
        assert full.choices[0].message.content == text and full.choices[0].finish_reason == "stop"


def test_json_object_and_logit_bias_inside_the_grammar(api_server: ApiServer, sdk: openai.OpenAI,
                                                       tiny_ckpt_dir: Path) -> None:
    from nemovl_trt.checkpoint.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_ckpt_dir)
    close = tok.encode("}")
    assert len(close) == 1
    r = sdk.chat.completions.create(model=api_server.model, messages=user("An empty object."), max_tokens=64,
                                    response_format={"type": "json_object"}, logit_bias={str(close[0]): 100})
    assert r.choices[0].message.content == "{}" and r.choices[0].finish_reason == "stop"
    r = sdk.chat.completions.create(model=api_server.model, messages=user("An object."), max_tokens=400, seed=3,
                                    temperature=1.0, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a JSON prefix that opens an object
        assert r.choices[0].message.content.startswith("{")


def test_langchain_with_structured_output(api_server: ApiServer) -> None:
    from langchain_openai import ChatOpenAI

    class Shape(BaseModel):
        model_config = ConfigDict(extra="forbid")
        colour: Literal["red", "green", "blue"]
        sides: int = Field(ge=0, le=12)
        label: str = Field(max_length=5)

    llm = ChatOpenAI(model=api_server.model, base_url=api_server.base_url, api_key="unused", temperature=0.7,
                     seed=5, max_retries=0)
    out = llm.with_structured_output(Shape).invoke("Describe a shape.")
    assert isinstance(out, Shape) and 0 <= out.sides <= 12
    raw = llm.with_structured_output(Shape, include_raw=True).invoke("Another shape.")
    assert isinstance(raw["parsed"], Shape) and raw["parsing_error"] is None


# ---------------------------------------------------------------- tools with the same machinery
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 8},
                                                "unit": {"enum": ["C", "F"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
    "required": ["zone"], "additionalProperties": False}}}


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_and_named_force_valid_calls(api_server: ApiServer, sdk: openai.OpenAI,
                                                          stream: bool) -> None:
    for seed in range(3):
        for choice, allowed in (("required", {"get_weather", "get_time"}),
                                ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})):
            kw = {"model": api_server.model, "messages": user("Weather or time?"), "tools": [WEATHER, TIME],
                  "tool_choice": choice, "temperature": 1.0, "seed": seed, "parallel_tool_calls": False}
            if stream:
                chunks = list(sdk.chat.completions.create(stream=True, **kw))
                finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
                content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                r = sdk.chat.completions.create(**kw)
                finish, calls, content = [r.choices[0].finish_reason], r.choices[0].message.tool_calls or [], \
                    r.choices[0].message.content or ""
            assert finish == ["tool_calls"] and len(calls) == 1 and not content, (finish, calls, content)
            name, args = calls[0].function.name, json.loads(calls[0].function.arguments)
            assert name in allowed
            if name == "get_time":
                assert set(args) == {"zone"} and -12 <= args["zone"] <= 12
            else:
                assert set(args) == {"city", "unit"} and args["unit"] in ("C", "F") and len(args["city"]) <= 8


# ---------------------------------------------------------------- logprobs
@pytest.fixture(scope="module")
def reference_lm(tiny_ckpt_dir: Path):
    from nemovl_trt.checkpoint.loader import load_checkpoint
    from nemovl_trt.model.vlm import NemotronVLM

    return NemotronVLM.from_checkpoint(load_checkpoint(tiny_ckpt_dir), dtype="float32").language_model


def _reference_logprobs(lm, prompt: list[int], generated: list[int], temperature: float, freq: float,
                        pres: float) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """log_softmax((logits - penalties) / T) at each generated position, from an uncached full forward."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = lm(ids)[0].double()
    chosen, tops = [], []
    counts = torch.zeros(logits.shape[-1], dtype=torch.float64)
    for j, tok in enumerate(generated):
        x = logits[len(prompt) - 1 + j] - freq * counts - pres * (counts > 0).double()
        lp = torch.log_softmax(x / (temperature or 1.0), dim=-1)
        chosen.append(float(lp[tok]))
        v, i = torch.topk(lp, 5)
        tops.append(list(zip(i.tolist(), v.tolist(), strict=True)))
        counts[tok] += 1
    return chosen, tops


@pytest.mark.parametrize(("temperature", "freq", "pres"), [(0.0, 0.0, 0.0), (0.8, 0.7, 0.3)])
def test_completion_logprobs_equal_reference_softmax(api_server: ApiServer, reference_lm, tiny_ckpt_dir: Path,
                                                     temperature: float, freq: float, pres: float) -> None:
    from nemovl_trt.checkpoint.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_ckpt_dir)
    prompt = tok.encode("The red circle is next to the blue square")
    body = {"model": api_server.model, "prompt": prompt, "max_tokens": 10, "logprobs": 5, "temperature": temperature,
            "frequency_penalty": freq, "presence_penalty": pres, "seed": 17, "ignore_eos": True}
    r = httpx.post(api_server.base_url + "/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 10 == len(lp["token_logprobs"])
    ids = _generated_ids(api_server, body)  # the same seeded request straight to Triton, for its token ids
    chosen, tops = _reference_logprobs(reference_lm, prompt, ids, temperature, freq, pres)
    for j in range(10):
        assert abs(lp["token_logprobs"][j] - chosen[j]) < 1e-4, (j, lp["token_logprobs"][j], chosen[j])
        ours = sorted(lp["top_logprobs"][j].values(), reverse=True)
        assert len(ours) <= 5 and all(abs(a - b[1]) < 1e-4 for a, b in zip(ours, tops[j], strict=False))
    if temperature == 0.0:  # greedy: the chosen token is the best one
        assert all(abs(lp["token_logprobs"][j] - tops[j][0][1]) < 1e-4 for j in range(10))


def _generated_ids(api: ApiServer, body: dict[str, Any]) -> list[int]:
    """The token ids a (seeded) completion generates, read from the `nemovl` model's `token_ids` output."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    from tests.fixtures_triton import nemovl_inputs

    params = {k: body[k] for k in ("temperature", "frequency_penalty", "presence_penalty", "seed", "ignore_eos",
                                   "max_tokens")}
    inputs = nemovl_inputs([], params)
    prompt = grpcclient.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([json.dumps(body["prompt"]).encode()], dtype=np.object_))
    inputs.append(prompt)
    client = grpcclient.InferenceServerClient(api.triton.grpc_url)
    q: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    client.async_stream_infer("nemovl", inputs)
    ids: list[int] = []
    try:
        while True:
            r, e = q.get(timeout=60)
            assert e is None, e
            ids += [int(x) for x in r.as_numpy("token_ids").reshape(-1)]
            if r.as_numpy("finish_reason")[0]:
                break
    finally:
        client.stop_stream()
        client.close()
    return ids


@pytest.mark.parametrize("k", [0, 3, 20])
def test_chat_top_logprobs_sorted_of_the_asked_size_streamed_and_not(api_server: ApiServer, sdk: openai.OpenAI,
                                                                     k: int) -> None:
    kw = {"model": api_server.model, "messages": user("Say something."), "max_tokens": 6, "temperature": 0.9,
          "seed": 8, "logprobs": True, "top_logprobs": k, "extra_body": {"ignore_eos": True}}
    r = sdk.chat.completions.create(**kw)
    items = r.choices[0].logprobs.content
    assert len(items) == 6
    for it in items:
        assert len(it.top_logprobs) == k
        vals = [t.logprob for t in it.top_logprobs]
        assert vals == sorted(vals, reverse=True) and all(v <= 0 for v in vals)
        if k:
            assert it.logprob <= vals[0] + 1e-6
            assert it.logprob >= vals[-1] - 1e-6 or it.token not in {t.token for t in it.top_logprobs}
    assert b"".join(bytes(it.bytes) for it in items).decode("utf-8", "replace") == r.choices[0].message.content
    chunks = list(sdk.chat.completions.create(stream=True, **kw))
    streamed = [it for c in chunks if c.choices and c.choices[0].logprobs for it in c.choices[0].logprobs.content]
    assert [(it.token, round(it.logprob, 6)) for it in streamed] == [(it.token, round(it.logprob, 6)) for it in items]


# ---------------------------------------------------------------- n choices
def test_n_choices(api_server: ApiServer, sdk: openai.OpenAI) -> None:
    msgs = _image_msgs("Tell me about it.")
    greedy = sdk.chat.completions.create(model=api_server.model, messages=msgs, max_tokens=8, n=3, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1
    one = sdk.chat.completions.create(model=api_server.model, messages=msgs, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert greedy.choices[0].message.content == one.choices[0].message.content
    assert greedy.usage.prompt_tokens == one.usage.prompt_tokens
    assert greedy.usage.completion_tokens == 3 * one.usage.completion_tokens == 24
    kw = {"model": api_server.model, "messages": msgs, "max_tokens": 8, "n": 3, "temperature": 1.0, "seed": 42}
    a = sdk.chat.completions.create(**kw)
    b = sdk.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # choices are independent draws
    chunks = list(sdk.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    per = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
           for i in range(3)}
    assert [per[i] for i in range(3)] == texts
    finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == a.usage.completion_tokens


# ---------------------------------------------------------------- penalties, bias, stop, seed
def _tokens(api: ApiServer, **kw: Any) -> list[str]:
    body = {"model": api.model, "prompt": "colour colour colour shape", "max_tokens": 24, "logprobs": 0,
            "ignore_eos": True, "temperature": 0, **kw}
    r = httpx.post(api.base_url + "/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def _repeats(tokens: list[str]) -> int:
    return len(tokens) - len(set(tokens))


def test_penalties_move_repetition_in_the_expected_direction(api_server: ApiServer) -> None:
    base = _repeats(_tokens(api_server))
    assert base > 0  # greedy decoding of random weights repeats itself
    assert _repeats(_tokens(api_server, frequency_penalty=2.0)) < base
    assert _repeats(_tokens(api_server, presence_penalty=2.0)) < base
    assert _repeats(_tokens(api_server, repetition_penalty=1.8)) <= base
    assert _repeats(_tokens(api_server, frequency_penalty=-2.0)) >= base


def test_logit_bias(api_server: ApiServer, tiny_ckpt_dir: Path) -> None:
    from nemovl_trt.checkpoint.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_ckpt_dir)
    forced = tok.encode(" circle")[0]
    toks = _tokens(api_server, logit_bias={str(forced): 100}, temperature=1.0, seed=1)
    assert set(toks) == {tok.decode([forced])}
    plain = _tokens(api_server)
    banned = {str(tok.encode(t)[0]): -100 for t in set(plain) if len(tok.encode(t)) == 1}
    assert not set(_tokens(api_server, logit_bias=banned)) & {t for t in set(plain) if str(tok.encode(t)[0]) in banned}


def test_stop_strings_split_across_tokens_never_appear(api_server: ApiServer, sdk: openai.OpenAI) -> None:
    kw = {"model": api_server.model, "messages": user("Go on."), "max_tokens": 30, "temperature": 1.0, "seed": 7,
          "logprobs": True, "extra_body": {"ignore_eos": True}}
    full = sdk.chat.completions.create(**kw)
    pieces = [it.token for it in full.choices[0].logprobs.content]
    text = full.choices[0].message.content
    j = next(j for j in range(3, len(pieces) - 1) if len(pieces[j]) >= 2 and len(pieces[j + 1]) >= 2
             and "\ufffd" not in pieces[j] + pieces[j + 1])
    stop = pieces[j][-2:] + pieces[j + 1][:2]  # spans the boundary between two tokens
    cut_at = text.index(stop)
    for stream in (False, True):
        if stream:
            chunks = list(sdk.chat.completions.create(stream=True, stop=[stop, "zzzz"], **kw))
            deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
            got = "".join(deltas)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert all(stop not in d for d in deltas)
        else:
            r = sdk.chat.completions.create(stop=[stop, "zzzz"], **kw)
            got, finish = r.choices[0].message.content or "", [r.choices[0].finish_reason]
        assert stop not in got and finish == ["stop"]
        assert got == text[:cut_at].rstrip() or got == text[:cut_at]


# ---------------------------------------------------------------- /v1/completions
def test_completions_text_tokens_echo_stream(api_server: ApiServer, sdk: openai.OpenAI, tiny_ckpt_dir: Path) -> None:
    from nemovl_trt.checkpoint.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_ckpt_dir)
    text = "Which shape is red"
    a = sdk.completions.create(model=api_server.model, prompt=text, max_tokens=6, seed=2, temperature=0.8)
    assert a.object == "text_completion" and a.id.startswith("cmpl-") and a.choices[0].finish_reason in ("stop", "length")
    assert a.usage.prompt_tokens == len(tok.encode(text)) and 1 <= a.usage.completion_tokens <= 6
    b = sdk.completions.create(model=api_server.model, prompt=tok.encode(text), max_tokens=6, seed=2, temperature=0.8)
    assert b.choices[0].text == a.choices[0].text
    e = sdk.completions.create(model=api_server.model, prompt=text, max_tokens=6, seed=2, temperature=0.8, echo=True,
                               logprobs=2)
    assert e.choices[0].text == text + a.choices[0].text
    lp = e.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(tok.encode(text)) + e.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) <= 2 for t in lp.top_logprobs[1:])
    ids_echo = sdk.completions.create(model=api_server.model, prompt=tok.encode(text), max_tokens=2, echo=True)
    assert ids_echo.choices[0].text.startswith(text)
    chunks = list(sdk.completions.create(model=api_server.model, prompt=text, max_tokens=6, seed=2, temperature=0.8,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == a.choices[0].text
    assert chunks[-1].usage.completion_tokens == a.usage.completion_tokens
    n3 = sdk.completions.create(model=api_server.model, prompt=text, max_tokens=4, n=3, temperature=0)
    assert len(n3.choices) == 3 and len({c.text for c in n3.choices}) == 1
    from langchain_openai import OpenAI as LangchainOpenAI

    llm = LangchainOpenAI(model=api_server.model, base_url=api_server.base_url, api_key="unused", max_tokens=4,
                          temperature=0, max_retries=0)
    assert isinstance(llm.invoke(text), str)


def test_completions_several_prompts_are_indexed_prompt_major(api_server: ApiServer, sdk: openai.OpenAI,
                                                                tiny_ckpt_dir: Path) -> None:
    """prompt as a list: choice i * n + j is prompt i's choice j, each exactly what the prompt alone gives."""
    from nemovl_trt.checkpoint.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_ckpt_dir)
    prompts = ["Which shape is red", "The blue square", "A circle"]
    kw = {"model": api_server.model, "max_tokens": 5, "n": 2, "temperature": 0.9, "seed": 3,
          "extra_body": {"ignore_eos": True}}
    alone = [sdk.completions.create(prompt=p, **kw) for p in prompts]
    many = sdk.completions.create(prompt=prompts, **kw)
    assert [c.index for c in many.choices] == list(range(6))
    assert [c.text for c in many.choices] == [c.text for a in alone for c in a.choices]
    assert {c.finish_reason for c in many.choices} == {"length"}
    assert many.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts) == sum(
        a.usage.prompt_tokens for a in alone)
    assert many.usage.completion_tokens == 6 * 5
    ids = sdk.completions.create(prompt=[tok.encode(p) for p in prompts], **kw)  # token-id lists
    assert [c.text for c in ids.choices] == [c.text for c in many.choices]
    echo = sdk.completions.create(prompt=prompts[:2], echo=True, **{**kw, "n": 1})
    assert [c.text[:len(p)] for c, p in zip(echo.choices, prompts[:2], strict=True)] == prompts[:2]
    chunks = list(sdk.completions.create(prompt=prompts, stream=True, stream_options={"include_usage": True}, **kw))
    per = {i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(6)}
    assert [per[i] for i in range(6)] == [c.text for c in many.choices]
    finishes = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finishes == list(range(6))
    assert chunks[-1].usage.completion_tokens == 30 and chunks[-1].usage.prompt_tokens == many.usage.prompt_tokens


def test_completions_best_of_returns_the_likeliest_candidates(api_server: ApiServer, sdk: openai.OpenAI) -> None:
    """best_of = k generates the same k candidates as n = k (same seed) and returns the n with the highest
    sum of token logprobs, best first; the usage counts every candidate, as OpenAI bills it."""
    kw = {"model": api_server.model, "prompt": "colour shape", "max_tokens": 6, "temperature": 1.0, "seed": 11,
          "extra_body": {"ignore_eos": True}}
    cands = sdk.completions.create(n=4, logprobs=0, **kw)
    score = {c.text: sum(c.logprobs.token_logprobs) for c in cands.choices}
    ranked = sorted(cands.choices, key=lambda c: (-score[c.text], c.index))
    assert len(score) > 1  # independent draws
    one = sdk.completions.create(best_of=4, **kw)
    assert [c.text for c in one.choices] == [ranked[0].text] and one.choices[0].index == 0
    assert one.choices[0].logprobs is None  # used for ranking, not asked for
    assert one.usage.completion_tokens == cands.usage.completion_tokens == 4 * 6
    two = sdk.completions.create(best_of=4, n=2, logprobs=1, **kw)
    assert [c.text for c in two.choices] == [c.text for c in ranked[:2]] and [c.index for c in two.choices] == [0, 1]
    assert [len(c.logprobs.tokens) for c in two.choices] == [6, 6]
    both = sdk.completions.create(best_of=3, n=1, **{**kw, "prompt": ["colour shape", "red circle"]})
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].text in score


def test_negative_seed_is_accepted_and_reproducible(api_server: ApiServer, sdk: openai.OpenAI) -> None:
    kw = {"model": api_server.model, "prompt": "colour shape", "max_tokens": 6, "temperature": 1.0,
          "extra_body": {"ignore_eos": True}}
    a = sdk.completions.create(seed=-(2**63), **kw)
    b = sdk.completions.create(seed=-(2**63), **kw)
    assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens == 6
    r = httpx.post(api_server.base_url + "/completions", json={**{k: v for k, v in kw.items() if k != "extra_body"},
                                                               "seed": 2**63}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"  # OpenAI's seed is an int64


@pytest.mark.parametrize(("fields", "code"), [
    ({"prompt": ""}, "invalid_parameter"),
    ({"prompt": ["a", ""]}, "invalid_parameter"),
    ({"prompt": []}, "invalid_parameter"),
    ({"prompt": ["x"] * 17}, "invalid_parameter"),
    ({"prompt": ["x"] * 9, "best_of": 8}, "invalid_parameter"),
    ({"prompt": [[1, 2], [10**7]]}, "invalid_parameter"),  # the engine refuses prompt 1: the whole request
    ({"prompt": [[1, 2], [2**40]]}, "invalid_parameter"),
    ({"prompt": [1, -2]}, "invalid_parameter"),
    ({"prompt": [10**7]}, "invalid_parameter"),
    ({"prompt": "x", "logprobs": 21}, "invalid_parameter"),
    ({"prompt": "x", "n": 3, "best_of": 2}, "invalid_parameter"),
    ({"prompt": "x", "best_of": 2, "stream": True}, "invalid_parameter"),
    ({"prompt": "x", "seed": 2**63}, "invalid_parameter"),
    ({"prompt": "x", "suffix": "y"}, "unsupported_parameter"),
    ({"prompt": "x", "n": 9}, "invalid_parameter"),
])
def test_completions_bad_values_then_served(api_server: ApiServer, sdk: openai.OpenAI, fields: dict[str, Any],
                                            code: str) -> None:
    r = httpx.post(api_server.base_url + "/completions", json={"model": api_server.model, **fields}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
    assert sdk.completions.create(model=api_server.model, prompt="ok", max_tokens=1).usage.completion_tokens == 1


def test_parse_error_names_the_schema_problem(api_server: ApiServer, sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model=api_server.model, messages=user("x"), response_format={
            "type": "json_schema", "json_schema": {"name": "t", "strict": True, "schema": {
                "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}}})
    assert e.value.body["code"] == "invalid_json_schema" and "uniqueItems" in e.value.body["message"]
    with pytest.raises(ValidationError):  # the helper itself is strict: sanity of the client side
        random_model(0).model_validate_json("{}")
