"""The reference engine's sampling surface without a server: n choices from one prefill (forked state),
logprobs against an uncached forward's own log-softmax, penalties and logit_bias as defined in
model/sampling.py, grammar-constrained output, prompt logprobs, cancelling one choice."""

from __future__ import annotations

import json

import pytest
import torch

from nemovl_trt.model.engine import ReferenceEngine, StepOutput, generate
from nemovl_trt.model.grammar import GrammarCompiler
from nemovl_trt.model.sampling import History, SamplingParams, process_logits
from nemovl_trt.model.vlm import NemotronVLM


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> NemotronVLM:
    return NemotronVLM.from_checkpoint(tiny_checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def compiler(tiny_checkpoint, model) -> GrammarCompiler:
    tok = tiny_checkpoint.tokenizer
    return GrammarCompiler.for_tokenizer(tok, model.cfg.llm.vocab_size, list(tok.eos_ids))


@pytest.fixture(scope="module")
def prompt(tiny_checkpoint) -> list[int]:
    return tiny_checkpoint.tokenizer.encode("The blue square is left of the red circle.")


def run(engine: ReferenceEngine) -> dict[tuple[str, int], list[StepOutput]]:
    events: dict[tuple[str, int], list[StepOutput]] = {}
    for _ in range(2000):
        if not engine.has_work():
            break
        for ev in engine.step():
            events.setdefault((ev.request_id, ev.index), []).append(ev)
    assert not engine.has_work()
    return events


def toks(evs: list[StepOutput]) -> list[int]:
    return [e.token_id for e in evs if e.token_id is not None]


def test_n_choices_share_one_prefill(model, prompt) -> None:
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    ref = generate(model, prompt, None, greedy)
    engine = ReferenceEngine(model)
    engine.add("a", prompt, None, SamplingParams(max_new_tokens=6, ignore_eos=True, n=3))
    ev = run(engine)
    assert [toks(ev[("a", i)]) for i in range(3)] == [ref] * 3
    assert engine.prefill_tokens == len(prompt)  # the prompt was computed once for 3 choices
    sampled = SamplingParams(max_new_tokens=8, ignore_eos=True, n=3, temperature=1.0, seed=11)
    first = run_one(model, prompt, sampled)
    assert first == run_one(model, prompt, sampled)  # seeded: repeatable
    assert len({tuple(t) for t in first}) == 3  # independent draws
    alone = generate(model, prompt, None, SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=1.0, seed=11))
    assert first[0] == alone  # choice 0 is what n = 1 gives for that seed


def run_one(model, prompt, params) -> list[list[int]]:
    engine = ReferenceEngine(model)
    engine.add("r", prompt, None, params)
    ev = run(engine)
    return [toks(ev[("r", i)]) for i in range(params.n)]


def test_cancel_one_choice_keeps_the_others(model, prompt) -> None:
    engine = ReferenceEngine(model)
    engine.add("a", prompt, None, SamplingParams(max_new_tokens=10, ignore_eos=True, n=2))
    first = {e.index: e for e in engine.step()}  # prefill: the first token of both choices
    engine.cancel("a", 1)
    ev = run(engine)
    assert first[1].token_id is not None and ev[("a", 1)] == [ev[("a", 1)][0]]
    assert ev[("a", 1)][0].finish_reason == "cancelled" and ev[("a", 1)][0].token_id is None
    assert ev[("a", 0)][-1].finish_reason == "length" and len(toks(ev[("a", 0)])) == 9  # + the first one


def _reference(model, prompt, out, params: SamplingParams) -> list[float]:
    """Each generated token's logprob from an uncached forward, with this test's own penalties."""
    with torch.no_grad():
        logits = model.language_model(torch.tensor([prompt + out]))[0].double()
    seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
    seen[prompt] = True
    counts = torch.zeros(logits.shape[-1], dtype=torch.float64)
    res = []
    for j, tok in enumerate(out):
        x = logits[len(prompt) - 1 + j].clone()
        for t, b in params.logit_bias:
            x[t] += b
        p = params.repetition_penalty
        x = torch.where(seen, torch.where(x > 0, x / p, x * p), x)
        x = x - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).double()
        res.append(float(torch.log_softmax(x / (params.temperature or 1.0), dim=-1)[tok]))
        counts[tok] += 1
        seen[tok] = True
    return res


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=5),
    SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=3, temperature=0.7, seed=2, frequency_penalty=0.8,
                   presence_penalty=-0.4, repetition_penalty=1.3, logit_bias=((25, 3.0), (30, -5.0))),
])
def test_logprobs_equal_the_reference_log_softmax(model, prompt, params) -> None:
    engine = ReferenceEngine(model)
    engine.add("r", prompt, None, params)
    evs = run(engine)[("r", 0)]
    out = toks(evs)
    ref = _reference(model, prompt, out, params)
    assert max(abs(e.logprob - r) for e, r in zip(evs, ref, strict=True)) < 1e-4
    for e in evs:
        vals = [v for _, v in e.top_logprobs]
        assert len(vals) == params.logprobs and vals == sorted(vals, reverse=True)
        assert e.logprob <= vals[0] + 1e-9


def test_prompt_logprobs(model, prompt) -> None:
    engine = ReferenceEngine(model)
    engine.add("r", prompt, None, SamplingParams(max_new_tokens=1, prompt_logprobs=2))
    first = run(engine)[("r", 0)][0]
    lp = first.prompt_logprobs
    assert lp is not None and len(lp) == len(prompt) and lp[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(model.language_model(torch.tensor([prompt]))[0], dim=-1)
    for j in range(1, len(prompt)):
        assert abs(lp[j][0] - float(ref[j - 1, prompt[j]])) < 1e-4 and len(lp[j][1]) == 2


def test_penalties_and_bias_shape_the_distribution() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    hist = History(4, [0])
    hist.add(2)
    hist.add(2)
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0, logit_bias=((3, 1.5),))
    got = process_logits(logits, p, hist).tolist()
    # token 0 (prompt): 2 / 2; token 2 (twice in the output): 0.5 / 2 - 0.5·2 - 0.25; token 3: +1.5
    assert got == pytest.approx([1.0, -1.0, 0.25 - 1.0 - 0.25, 1.5])
    masked = process_logits(logits, SamplingParams(temperature=2.0), None, torch.tensor([True, False, True, True]))
    assert masked[1] == float("-inf") and masked[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((1, 101.0),)).validate(10)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SamplingParams(logit_bias=((10, 1.0),)).validate(10)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0).validate()


SCHEMA = {"type": "object", "properties": {
    "colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": 0, "maximum": 20},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    "box": {"type": "object", "properties": {"w": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.1}},
            "required": ["w"], "additionalProperties": False}},
    "required": ["colour", "count", "tags", "box"], "additionalProperties": False}


def test_grammar_constrains_every_choice(model, prompt, compiler, tiny_checkpoint) -> None:
    grammar = compiler.compile({"type": "json_schema", "schema": SCHEMA, "strict": True})
    assert compiler.compile({"type": "json_schema", "schema": SCHEMA, "strict": True}) is grammar  # cached
    engine = ReferenceEngine(model, tiny_checkpoint.tokenizer.eos_ids)
    engine.add("g", prompt, None, SamplingParams(max_new_tokens=300, temperature=1.0, seed=4, n=4, grammar=grammar,
                                                 logprobs=1))
    ev = run(engine)
    for i in range(4):
        assert ev[("g", i)][-1].finish_reason == "stop"
        data = json.loads(tiny_checkpoint.tokenizer.decode(toks(ev[("g", i)])))
        assert set(data) == {"colour", "count", "tags", "box"} and data["colour"] in ("red", "green", "blue")
        assert 0 <= data["count"] <= 20 and len(data["tags"]) <= 2 and 0 <= data["box"]["w"] <= 1
        assert all(e.logprob > float("-inf") for e in ev[("g", i)])


def test_grammar_after_a_thinking_block_and_tool_calls(compiler, tiny_checkpoint) -> None:
    tok = tiny_checkpoint.tokenizer
    think = compiler.compile({"type": "json_object", "reasoning": True}).matcher()
    for t in tok.encode("let me think") + [tok.special["</think>"]] + tok.encode('{"a":1}'):
        think.consume(t)
    assert think.done
    calls = compiler.compile({"type": "tool_calls", "parallel": False, "tools": [
        {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}},
                                     "required": ["x"], "additionalProperties": False}, "strict": True}]}).matcher()
    first = calls.allowed()
    assert first.nonzero().flatten().tolist() == [tok.special["<TOOLCALL>"]]  # a call is forced
    with pytest.raises(RuntimeError, match="rejected"):
        calls.copy().consume(tok.encode("hello")[0])
    for t in [tok.special["<TOOLCALL>"]] + tok.encode('[{"name":"f","arguments":{"x":7}}]') + [tok.special["</TOOLCALL>"]]:
        calls.consume(t)
    assert calls.done


FLT_MIN = 1.1754943508222875e-38  # the temperature fuzzing found (issue 18)


def test_tiny_temperature_is_greedy(model, prompt) -> None:
    from nemovl_trt.model.sampling import GREEDY_TEMPERATURE, draw, make_generator

    tiny = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=FLT_MIN, seed=3)
    assert tiny.is_greedy and SamplingParams(temperature=GREEDY_TEMPERATURE).is_greedy is False
    logits = torch.tensor([5.0, 40.0, 39.5, -3.0])
    scaled = process_logits(logits, tiny)
    assert torch.equal(scaled, logits)  # not divided: x / FLT_MIN would be inf (then NaN after softmax)
    assert draw(scaled, tiny, make_generator(0)) == 1
    just_above = SamplingParams(temperature=2 * GREEDY_TEMPERATURE)
    assert torch.allclose(process_logits(logits, just_above), logits / (2 * GREEDY_TEMPERATURE))
    greedy = generate(model, prompt, None, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert generate(model, prompt, None, tiny) == greedy and len(greedy) == 12


VOCAB_ALL = 1512  # the tiny preset's vocabulary (config.llm.vocab_size); checked in the test


class FailingGrammar:
    """A grammar handle (model.grammar's duck type) whose matcher raises once `fail_after` tokens were
    consumed: a real exception inside `ReferenceEngine.step` for one choice."""

    def __init__(self, fail_after: int) -> None:
        self.fail_after = fail_after

    def matcher(self) -> FailingGrammar.Matcher:
        return FailingGrammar.Matcher(self.fail_after)

    class Matcher:
        def __init__(self, fail_after: int) -> None:
            self.left, self.done = fail_after, False

        def allowed(self) -> torch.Tensor:
            if self.left <= 0:
                raise RuntimeError("injected sampling failure")
            return torch.ones(VOCAB_ALL, dtype=torch.bool)

        def consume(self, token: int) -> None:
            self.left -= 1



def test_a_failing_choice_ends_with_an_error_and_the_batch_goes_on(model, prompt) -> None:
    assert model.cfg.llm.vocab_size == VOCAB_ALL
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    ref = generate(model, prompt, None, params)
    engine = ReferenceEngine(model)
    engine.add("ok", prompt, None, params)
    engine.add("bad", prompt, None, SamplingParams(max_new_tokens=8, ignore_eos=True, n=2,
                                                   grammar=FailingGrammar(3)))
    ev = run(engine)  # step() never raised
    assert toks(ev[("ok", 0)]) == ref and ev[("ok", 0)][-1].finish_reason == "length"
    for i in range(2):
        last = ev[("bad", i)][-1]
        assert len(toks(ev[("bad", i)])) == 3
        assert last.finished and last.token_id is None and last.finish_reason == "error:injected sampling failure"
    engine.add("bad", prompt, None, params)  # the failed id was released
    assert toks(run(engine)[("bad", 0)]) == ref
    with pytest.raises(RuntimeError, match="generation failed: injected sampling failure"):
        generate(model, prompt, None, SamplingParams(max_new_tokens=8, ignore_eos=True, grammar=FailingGrammar(2)))
