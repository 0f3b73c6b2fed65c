"""Media references → bytes: data URLs, bare base64, http(s) fetches with caps and the SSRF guard."""

from __future__ import annotations

import asyncio
import base64
import ipaddress

import pytest

from nemovl_trt.server.errors import APIError
from nemovl_trt.server.media import MediaPolicy, _ip_blocked, load_media
from tests.fixtures_server import MEDIA_ALLOWED_HOST, MediaServer

PAYLOAD = bytes(range(256)) * 4  # 1 KiB, every byte value


def policy(**kw) -> MediaPolicy:
    base = {"max_bytes": 64 * 1024, "timeout_s": 2.0, "max_redirects": 2, "allow_hosts": [MEDIA_ALLOWED_HOST]}
    base.update(kw)
    return MediaPolicy(**base)


def load(url: str, pol: MediaPolicy | None = None, kind: str = "image") -> bytes:
    return asyncio.run(load_media(url, pol or policy(), kind, "messages[0].content[0].image_url"))


def err(url: str, pol: MediaPolicy | None = None, kind: str = "image") -> APIError:
    with pytest.raises(APIError) as e:
        load(url, pol, kind)
    assert e.value.status == 400
    assert e.value.to_dict()["error"]["type"] == "invalid_request_error"
    return e.value


@pytest.fixture(scope="module")
def files(media_server: MediaServer) -> MediaServer:
    media_server.files["a.bin"] = ("image/png", PAYLOAD)
    return media_server


def test_data_url_and_bare_base64() -> None:
    b64 = base64.b64encode(PAYLOAD).decode()
    assert load(f"data:image/png;base64,{b64}") == PAYLOAD
    assert load(f"data:application/octet-stream;base64,{b64}") == PAYLOAD  # mime is not trusted either way
    assert load(b64) == PAYLOAD
    assert load(base64.urlsafe_b64encode(PAYLOAD).decode().rstrip("=")) == PAYLOAD
    assert load(b64[:76] + "\n" + b64[76:]) == PAYLOAD


@pytest.mark.parametrize(("url", "code"), [
    ("data:image/png;base64,%%%notbase64%%%", "invalid_image"),
    ("data:image/png,rawtext", "invalid_image_url"),
    ("data:image/png;base64", "invalid_image_url"),
    ("ftp://example.com/a.png", "invalid_image_url"),
    ("file:///etc/passwd", "invalid_image_url"),
    ("not a url", "invalid_image_url"),
    ("", "invalid_image_url"),
])
def test_bad_references(url: str, code: str) -> None:
    assert err(url).code == code


def test_video_kind_codes() -> None:
    assert err("data:video/mp4;base64,!!!!!!!!", kind="video").code == "invalid_video"


def test_fetch_allowed_host(files: MediaServer) -> None:
    assert load(files.url("a.bin")) == PAYLOAD


def test_ssrf_guard_refuses_loopback_unless_allowed(files: MediaServer) -> None:
    e = err(files.url("a.bin", host="127.0.0.1"))
    assert e.code == "invalid_image_url" and "non-public" in e.message
    assert load(files.url("a.bin", host="127.0.0.1"), policy(allow_hosts=["127.0.0.0/8"])) == PAYLOAD
    assert err(files.url("a.bin"), policy(allow_hosts=[])).code == "invalid_image_url"


def test_redirects_are_checked_and_capped(files: MediaServer) -> None:
    ok = files.url("redirect?to=/a.bin")
    assert load(ok) == PAYLOAD
    to_blocked = files.url(f"redirect?to=http://127.0.0.1:{files.port}/a.bin")
    assert "non-public" in err(to_blocked).message
    chain = files.url("a.bin")
    for _ in range(3):
        chain = files.url("redirect?to=" + chain.replace("?", "%3F").replace("=", "%3D").replace("&", "%26"))
    assert "redirected more than" in err(chain).message


def test_size_time_and_status_caps(files: MediaServer) -> None:
    e = err(files.url("big?n=70000"))
    assert e.code == "image_too_large"
    assert load(files.url("big?n=1000")) == b"\0" * 1000
    assert err(files.url("a.bin"), policy(max_bytes=100)).code == "image_too_large"
    assert "longer than" in err(files.url("slow?s=2"), policy(timeout_s=0.3)).message
    assert "HTTP 404" in err(files.url("missing.png")).message
    b64 = base64.b64encode(PAYLOAD).decode()
    assert err(b64, policy(max_bytes=100)).code == "image_too_large"


@pytest.mark.parametrize(("ip", "blocked"), [
    ("127.0.0.1", True), ("10.1.2.3", True), ("192.168.0.1", True), ("172.16.5.5", True),
    ("169.254.169.254", True), ("0.0.0.0", True), ("::1", True), ("fe80::1", True), ("fc00::1", True),
    ("::ffff:127.0.0.1", True), ("224.0.0.1", True), ("8.8.8.8", False), ("2606:4700::1111", False),
])
def test_ip_classification(ip: str, blocked: bool) -> None:
    assert _ip_blocked(ipaddress.ip_address(ip)) is blocked


def test_unresolvable_host() -> None:
    assert "could not be resolved" in err("http://no-such-host.invalid/a.png", policy(allow_hosts=[])).message
