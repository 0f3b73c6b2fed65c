"""Turn an OpenAI `image_url` / `video_url` into bytes: `data:` URLs, bare base64 and http(s) fetches.

Bytes are not decoded here (the Triton preprocessor sniffs the format and returns typed errors); this
module only gets them, under a size cap, a time cap and a redirect cap, refusing loopback / private /
link-local / reserved addresses unless the host is on the allow-list (SSRF guard).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx

from nemovl_trt.server.errors import APIError

_B64_RE = re.compile(rb"^[A-Za-z0-9+/\r\n]+={0,2}\s*$")
_B64URL_RE = re.compile(rb"^[A-Za-z0-9_\-\r\n]+={0,2}\s*$")


@dataclass
class MediaPolicy:
    """Limits for fetching media. `allow_hosts` entries are hostnames, IP addresses or CIDR networks."""

    max_bytes: int
    timeout_s: float
    max_redirects: int
    allow_hosts: list[str] = field(default_factory=list)

    def host_allowed(self, host: str) -> bool:
        """True when `host` (a name or a literal IP) is explicitly on the allow-list."""
        host = host.lower().strip("[]")
        for entry in self.allow_hosts:
            entry = entry.lower().strip()
            if not entry:
                continue
            if entry == host:
                return True
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        return False


def media_error(kind: str, message: str, param: str, code: str | None = None) -> APIError:
    """A 400 about one media part; `kind` is "image" or "video"."""
    return APIError(400, message, code=code or f"invalid_{kind}_url", param=param)


def _decode_b64(data: str | bytes, kind: str, param: str) -> bytes:
    raw = data.encode("ascii", "ignore") if isinstance(data, str) else data
    raw = re.sub(rb"\s", b"", raw).rstrip(b"=")
    if len(raw) % 4 == 1 or not raw:
        raise media_error(kind, f"The {kind} data is not valid base64.", param, f"invalid_{kind}")
    raw += b"=" * (-len(raw) % 4)
    try:
        if b"-" in raw or b"_" in raw:
            out = base64.urlsafe_b64decode(raw)
        else:
            out = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise media_error(kind, f"The {kind} data is not valid base64.", param, f"invalid_{kind}") from e
    return out


def decode_data_url(url: str, kind: str, param: str) -> bytes:
    """`data:<mime>[;params];base64,<data>` → bytes. Raises a 400 APIError for anything else."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise media_error(kind, f"The {kind} data URL has no ',' separating the header from the data.", param)
    if ";base64" not in header.lower():
        raise media_error(kind, f"The {kind} data URL must be base64-encoded (data:<mime>;base64,...).", param)
    return _decode_b64(payload, kind, param)


def looks_like_base64(text: str) -> bool:
    """True when `text` (a bare string without a scheme) is plausibly base64 data."""
    raw = text.strip().encode("ascii", "ignore")
    return len(raw) >= 16 and bool(_B64_RE.match(raw) or _B64URL_RE.match(raw))


def _ip_blocked(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified or not ip.is_global)


async def check_host(host: str, port: int, policy: MediaPolicy, kind: str, param: str) -> None:
    """Refuse hosts that resolve to a non-public address unless allow-listed (400)."""
    if policy.host_allowed(host):
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise media_error(kind, f"The {kind} URL host '{host}' could not be resolved.", param) from e
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if policy.host_allowed(str(ip)):
            continue
        if _ip_blocked(ip):
            raise media_error(kind, f"The {kind} URL host '{host}' resolves to a non-public address, which "
                                    "this server does not fetch (see --allow-media-host).", param)


async def fetch_url(url: str, policy: MediaPolicy, kind: str, param: str,
                    client: httpx.AsyncClient | None = None) -> bytes:
    """GET an http(s) URL with the policy's caps, following at most `max_redirects` checked redirects."""
    own = client is None
    client = client or httpx.AsyncClient(follow_redirects=False, trust_env=False)
    try:
        return await asyncio.wait_for(_fetch(url, policy, kind, param, client), timeout=policy.timeout_s)
    except TimeoutError as e:
        raise media_error(kind, f"Fetching the {kind} URL took longer than {policy.timeout_s:g} s.", param) from e
    finally:
        if own:
            await client.aclose()


async def _fetch(url: str, policy: MediaPolicy, kind: str, param: str, client: httpx.AsyncClient) -> bytes:
    for _ in range(policy.max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise media_error(kind, f"The {kind} URL must be http(s), a data: URL or base64 data.", param)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        await check_host(parts.hostname, port, policy, kind, param)
        try:
            async with client.stream("GET", url, follow_redirects=False) as resp:
                if resp.is_redirect:
                    location = resp.headers.get("location")
                    if not location:
                        raise media_error(kind, f"The {kind} URL redirected without a Location.", param)
                    url = urljoin(url, location)
                    continue
                if resp.status_code != 200:
                    raise media_error(kind, f"Fetching the {kind} URL returned HTTP {resp.status_code}.", param)
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                    raise _too_large(kind, policy, param)
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > policy.max_bytes:
                        raise _too_large(kind, policy, param)
                    chunks.append(chunk)
                data = b"".join(chunks)
                if not data:
                    raise media_error(kind, f"The {kind} URL returned an empty body.", param, f"invalid_{kind}")
                return data
        except httpx.HTTPError as e:
            raise media_error(kind, f"The {kind} URL could not be fetched ({type(e).__name__}).", param) from e
    raise media_error(kind, f"The {kind} URL redirected more than {policy.max_redirects} times.", param)


def _too_large(kind: str, policy: MediaPolicy, param: str) -> APIError:
    return media_error(kind, f"The {kind} is larger than the {policy.max_bytes} byte limit.", param,
                       f"{kind}_too_large")


async def load_media(url: str, policy: MediaPolicy, kind: str, param: str,
                     client: httpx.AsyncClient | None = None) -> bytes:
    """Any accepted form of media reference → raw bytes (400 APIError on failure)."""
    if not isinstance(url, str) or not url.strip():
        raise media_error(kind, f"The {kind} URL must be a non-empty string.", param)
    url = url.strip()
    low = url[:8].lower()
    if low.startswith("data:"):
        data = decode_data_url(url, kind, param)
    elif low.startswith(("http://", "https://")):
        return await fetch_url(url, policy, kind, param, client)
    elif looks_like_base64(url):
        data = _decode_b64(url, kind, param)
    else:
        raise media_error(kind, f"The {kind} URL must be http(s), a data: URL or base64 data.", param)
    if len(data) > policy.max_bytes:
        raise _too_large(kind, policy, param)
    return data
