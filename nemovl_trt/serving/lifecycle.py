"""Process lifecycle of `nemovl serve`: signals, draining, and the order things stop in.

uvicorn (≥ 0.29) re-raises a captured SIGTERM/SIGINT after its server loop ends, with the default handler
back in place, so the process dies right there and nothing after `uvicorn.run()` runs: that is how
`nemovl serve` used to leave tritonserver and its stubs behind on SIGTERM. `DrainingServer` keeps uvicorn's
graceful shutdown but does not re-raise, and calls `on_signal` first (the edge then refuses new chat requests
with 503 while the in-flight ones finish).

On SIGTERM / SIGINT: stop accepting connections, let in-flight requests finish for up to `grace_s` seconds
(uvicorn's `timeout_graceful_shutdown`), cancel what is left (which cancels the Triton requests), run the
app's lifespan shutdown, return. The caller (`serve_stack`) then stops the supervisor (tritonserver gets
SIGINT, then its whole process group SIGKILL, its shared memory removed) and tells the watchdog `done`.
A second Ctrl-C skips the wait.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Generator

import uvicorn

log = logging.getLogger("nemovl.lifecycle")
HANDLED = (signal.SIGINT, signal.SIGTERM)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains on SIGTERM/SIGINT and returns normally (no signal re-raised)."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[int], None] | None = None) -> None:
        super().__init__(config)
        self.on_signal = on_signal
        self.received: list[int] = []

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self._handle) for sig in HANDLED}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def _handle(self, sig: int, frame: object) -> None:
        self.received.append(sig)
        if len(self.received) == 1:
            log.warning("received %s: draining in-flight requests for up to %s s", signal.Signals(sig).name,
                        self.config.timeout_graceful_shutdown)
        if self.on_signal is not None:
            try:
                self.on_signal(sig)
            except Exception:  # noqa: BLE001
                log.exception("on_signal callback failed")
        self.handle_exit(sig, None)  # type: ignore[arg-type]
