"""A `runtime.engine_api.Sink` for engine tests: collects the streamed ids and the finish reason."""

from __future__ import annotations

import threading

WAIT_S = 20.0


class ListSink:
    """Collects streamed ids; `gone_after` makes it report that its requester left after that many ids.
    A message after the final one is a test failure."""

    def __init__(self, gone_after: int | None = None) -> None:
        self.ids: list[int] = []
        self.by_choice: dict[int, list[int]] = {}
        self.finishes: dict[int, str] = {}
        self.logprobs: dict[int, list] = {}
        self.prompt_logprobs: list | None = None
        self.finish = ""
        self.calls = 0
        self.sizes: list[int] = []  # token ids per message, in order
        self.done = threading.Event()
        self.gone_after = gone_after

    def send(self, token_ids: list[int], finish_reason: str, index: int = 0, logprobs: dict | None = None,
             done: bool | None = None) -> None:
        assert not self.done.is_set(), "a request got a message after its final one"
        self.ids += token_ids
        self.sizes.append(len(token_ids))
        self.by_choice.setdefault(index, []).extend(token_ids)
        if logprobs:
            self.logprobs.setdefault(index, []).extend(logprobs.get("tokens", []))
            if "prompt" in logprobs:
                self.prompt_logprobs = logprobs["prompt"]
        self.calls += 1
        if finish_reason:
            self.finishes[index] = finish_reason
            self.finish = finish_reason
        if done if done is not None else bool(finish_reason):
            self.done.set()

    def is_cancelled(self) -> bool:
        return self.gone_after is not None and len(self.ids) >= self.gone_after

    def wait(self) -> ListSink:
        assert self.done.wait(WAIT_S), "no final message"
        return self
