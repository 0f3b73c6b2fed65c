"""schemathesis hooks of the fuzz tests (loaded through SCHEMATHESIS_HOOKS): keep generation short.

A schema-valid request may ask for thousands of tokens (or none, which lets the engine fill the context);
on a 2-core CPU that turns a one-minute fuzz run into a handful of requests. Integer `max_tokens` /
`max_completion_tokens` above 16 become 16 and a body without either gets `max_tokens: 16`; every other
generated value, valid or not, is sent as generated, except one known bug kept out of the random run and
tracked by its own test (tests/test_fuzz_corpus.py::test_sampling_error_mid_stream_is_not_a_hang): a
temperature in (0, 1e-5) overflows the logits (x / T = inf → NaN → torch.multinomial raises mid-generation)
and that error never reaches the client, so such a value is sent as 1e-5 here.
"""

from __future__ import annotations

import schemathesis

CAP = 16
TINY_TEMPERATURE = 1e-5


@schemathesis.hook
def map_body(context, body):  # noqa: ARG001 - hook signature
    if isinstance(body, dict):
        present = False
        for key in ("max_tokens", "max_completion_tokens"):
            v = body.get(key)
            if key in body:
                present = True
            if isinstance(v, int) and not isinstance(v, bool) and v > CAP:
                body[key] = CAP
        if not present:
            body["max_tokens"] = CAP
        t = body.get("temperature")
        if isinstance(t, float | int) and not isinstance(t, bool) and 0 < t < TINY_TEMPERATURE:
            body["temperature"] = TINY_TEMPERATURE
    return body
