"""Session fixtures of the server area.

- `media_server`: a loopback HTTP server (stdlib) serving test files, redirects, slow and large bodies;
  reachable as `http://localhost:<port>/...` (allow-listed by `api_server`) and
  `http://127.0.0.1:<port>/...` (not allow-listed: refused by the SSRF guard).
- `api_server`: the OpenAI frontend (uvicorn, free loopback port) in front of the `triton_server` fixture.
- `trained_api`: the whole served stack (`nemovl_trt.demo` build + serve) on data/tiny-trained, per module.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

MEDIA_ALLOWED_HOST = "localhost"


@dataclass
class MediaServer:
    """A loopback file server. `files[name] = (content_type, bytes)`; `hits` counts GETs per path."""

    port: int
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)

    def url(self, path: str, host: str = MEDIA_ALLOWED_HOST) -> str:
        return f"http://{host}:{self.port}/{path.lstrip('/')}"


def _handler(ms: MediaServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            parts = urlsplit(self.path)
            path = parts.path.lstrip("/")
            ms.hits[path] = ms.hits.get(path, 0) + 1
            q = parse_qs(parts.query)
            if path == "redirect":
                self.send_response(302)
                self.send_header("Location", q["to"][0])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if path == "slow":
                time.sleep(float(q.get("s", ["3"])[0]))
            if path == "big":  # streamed without Content-Length
                size = int(q["n"][0])
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                self.wfile.write(b"\0" * size)
                return
            if path not in ms.files:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            ctype, data = ms.files[path]
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@pytest.fixture(scope="session")
def media_server() -> Iterator[MediaServer]:
    """A loopback HTTP server for media-fetch tests (IPv4, all loopback names)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(MediaServer(0)))
    ms = MediaServer(httpd.server_address[1])
    httpd.RequestHandlerClass = _handler(ms)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield ms
    httpd.shutdown()
    httpd.server_close()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ApiServer:
    """A running frontend: `base_url` ends with `/v1`; `state` is the app's ServerState."""

    base_url: str
    root_url: str
    model: str
    triton: object
    state: object
    media: MediaServer


@pytest.fixture(scope="session")
def api_server(request: pytest.FixtureRequest, media_server: MediaServer) -> Iterator[ApiServer]:
    """The OpenAI frontend on a free loopback port in front of the session's real tritonserver."""
    import uvicorn

    from nemovl_trt.server.app import create_app
    from nemovl_trt.server.settings import Settings

    try:
        triton = request.getfixturevalue("triton_server")
    except pytest.FixtureLookupError:
        pytest.skip("the triton_server fixture (tests/fixtures_triton.py) is not available yet")
    grpc_url = getattr(triton, "grpc_url", None) or f"127.0.0.1:{triton.grpc_port}"
    settings = Settings(triton_urls=[grpc_url], allow_media_hosts=[MEDIA_ALLOWED_HOST], max_concurrent=4,
                        max_queued=4)
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name="nemovl-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the frontend did not start within 30 s")
        time.sleep(0.02)
    root = f"http://127.0.0.1:{port}"
    try:
        yield ApiServer(base_url=root + "/v1", root_url=root, model=settings.model_name, triton=triton,
                        state=app.state.nemovl, media=media_server)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


TRAINED = Path(__file__).resolve().parent.parent / "data" / "tiny-trained"


@pytest.fixture(scope="module")
def trained_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The served stack on the trained checkpoint; yields the API root URL (``http://127.0.0.1:PORT``).
    Media URLs on 127.0.0.1 are allowed (tests serve files there)."""
    if not (TRAINED / "config.json").is_file():
        pytest.skip("data/tiny-trained is not committed")
    from nemovl_trt import demo

    work = tmp_path_factory.mktemp("trained_stack")
    engines, repo = demo.build(TRAINED, work, log=lambda _: None)
    with demo.serve(repo, engines, log=lambda _: None, allow_media_hosts=("127.0.0.1",)) as base:
        yield base.removesuffix("/v1")
