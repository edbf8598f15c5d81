"""Checks every HTTP request to the extension's routes passes before any work: origin, media type, body size.

A page the user visits can send requests to the WebUI (it often listens on the network): a plain form post
(``text/plain``) needs no CORS preflight, and a foreign page's request carries its ``Origin``. So the routes take
``application/json`` only, refuse an ``Origin`` (or, without one, a ``Referer``) that is not the WebUI's own
address, and read a bounded body. Requests with neither header (curl, scripts) pass: ``--api-auth`` guards those.
Everything here is plain functions of header values and bytes, so tests need no server.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import urlsplit

MAX_BODY_BYTES = 64 * 1024  # a job is a few dozen keys; even 100 sample prompts fit many times over
MAX_JSON_DEPTH = 8  # a job is an object of scalars and lists of strings: depth 2
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class RequestRefused(Exception):  # noqa: N818 - a refusal with its HTTP status, not an error of ours
    """A request the routes refuse; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _address(url: str, scheme: str | None = None) -> tuple[str, int] | None:
    """``(host, port)`` of an origin or URL (``//host:port`` with ``scheme``); None when it has none."""
    try:
        parts = urlsplit(url.strip() if scheme is None else f"//{url.strip()}")
        scheme = (parts.scheme or scheme or "").lower()
        host, port = parts.hostname, parts.port
    except ValueError:  # a malformed port or bracketed host
        return None
    if not host or scheme not in _DEFAULT_PORTS:
        return None
    return host.lower(), port if port is not None else _DEFAULT_PORTS[scheme]


def _origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL, as a browser writes it in ``Origin``."""
    parts = urlsplit(url.strip())
    return f"{parts.scheme}://{parts.netloc}".lower()


def _matches(pattern: str, origin: str) -> bool:
    try:
        return re.fullmatch(pattern, origin) is not None
    except re.error:  # the WebUI's own CORS setup fails on it too; trust nothing more
        return False


def check_origin(origin: str | None, referer: str | None, host: str | None, scheme: str = "http",
                 trusted: Iterable[str] = (), trusted_regex: str | None = None) -> None:
    """Refuse (403) a request whose ``Origin`` (else ``Referer``) is not the WebUI's own address.

    Own addresses: the request's ``Host`` (same host and port, whatever name or IP the user typed, as with
    ``--listen``), each URL in ``trusted`` (the ``--share`` link, ``--cors-allow-origins``) and, when set, origins
    matching ``trusted_regex`` (``--cors-allow-origins-regex``). Without either header the request passes.
    """
    claimed = origin if origin is not None else referer
    if claimed is None:
        return
    header = "Origin" if origin is not None else "Referer"
    address = _address(claimed)
    own = [_address(host, scheme)] if host else []
    own += [_address(url) for url in trusted if url]
    if address is not None and address in own:
        return
    if address is not None and trusted_regex and _matches(trusted_regex, _origin_of(claimed)):
        return
    raise RequestRefused(403, f"cross-origin request refused ({header}: {claimed[:200]}); the LoRA Train API "
                              "answers only the WebUI's own pages (add other sites with --cors-allow-origins)")


def check_json_content_type(content_type: str | None) -> None:
    """Refuse (415) anything but ``application/json`` (a ``charset`` parameter is fine)."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise RequestRefused(415, f"the body must be JSON sent as Content-Type: application/json, "
                                  f"got {(content_type or 'none')[:100]!r}")


def _too_large(limit: int) -> RequestRefused:
    return RequestRefused(413, f"the request body is larger than {limit // 1024} KiB; a job is a small JSON "
                               "object of config keys")


def check_content_length(content_length: str | None, limit: int = MAX_BODY_BYTES) -> None:
    """Refuse (413) a body whose declared length is over ``limit``, before reading it."""
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError as err:
        raise RequestRefused(400, f"Content-Length {content_length[:40]!r} is not a number") from err
    if declared > limit:
        raise _too_large(limit)


async def read_bounded(chunks: AsyncIterator[bytes], limit: int = MAX_BODY_BYTES) -> bytes:
    """The body from its chunks, refused (413) as soon as more than ``limit`` bytes have arrived."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON ``text`` (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse_json_body(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode a UTF-8 JSON body; refuses (400) bad encoding, bad JSON and nesting deeper than ``max_depth``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestRefused(400, "the body must be UTF-8 encoded JSON") from err
    if json_depth(text) > max_depth:
        raise RequestRefused(400, f"the JSON body nests deeper than {max_depth} levels; a job is an object of "
                                  "values and lists")
    try:
        return json.loads(text)
    except ValueError as err:
        raise RequestRefused(400, f"the body is not valid JSON: {err}") from err
