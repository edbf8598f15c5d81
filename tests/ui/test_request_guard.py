"""Request checks of the HTTP routes: origin, media type, body size and JSON nesting, as plain functions."""

from __future__ import annotations

import asyncio

import pytest

from lora_trainer.ui import request_guard as guard
from lora_trainer.ui.request_guard import RequestRefused


def refused_status(fn, *args, **kwargs) -> int | None:
    try:
        fn(*args, **kwargs)
    except RequestRefused as err:
        return err.status
    return None


@pytest.mark.parametrize(("origin", "referer", "host"), [
    (None, None, "127.0.0.1:7860"),  # curl, scripts: --api-auth guards those
    ("http://127.0.0.1:7860", None, "127.0.0.1:7860"),
    ("http://LOCALHOST:7860", None, "localhost:7860"),
    ("http://192.168.1.20:7860", None, "192.168.1.20:7860"),  # --listen, reached by the LAN address
    ("http://[::1]:7860", None, "[::1]:7860"),
    ("http://webui.lan", None, "webui.lan:80"),  # default port written or not
    ("https://webui.lan", None, "webui.lan"),
    (None, "http://127.0.0.1:7860/?__theme=dark", "127.0.0.1:7860"),
])
def test_own_origin_and_no_origin_pass(origin, referer, host):
    scheme = "https" if (origin or "").startswith("https") else "http"
    assert refused_status(guard.check_origin, origin, referer, host, scheme) is None


@pytest.mark.parametrize(("origin", "referer"), [
    ("http://evil.example", None),
    ("http://127.0.0.1:7861", None),  # another port is another site
    ("https://127.0.0.1", None),  # https's default port is another port
    ("null", None),  # sandboxed frames and file:// pages
    ("", None),
    ("http://127.0.0.1:notaport", None),
    (None, "http://evil.example/page.html"),
    ("http://evil.example", "http://127.0.0.1:7860/"),  # Origin wins over Referer
])
def test_foreign_origin_is_refused(origin, referer):
    assert refused_status(guard.check_origin, origin, referer, "127.0.0.1:7860") == 403


def test_share_link_and_cors_settings_are_trusted():
    share = "https://abc123.gradio.live"
    assert refused_status(guard.check_origin, share, None, "127.0.0.1:7860", trusted=[share]) is None
    assert refused_status(guard.check_origin, "http://app.example:3000", None, "127.0.0.1:7860",
                          trusted=["http://app.example:3000", "http://other.example"]) is None
    assert refused_status(guard.check_origin, "https://x.tools.example", None, "127.0.0.1:7860",
                          trusted_regex=r"https://.*\.tools\.example") is None
    assert refused_status(guard.check_origin, "https://x.tools.example.evil", None, "127.0.0.1:7860",
                          trusted_regex=r"https://.*\.tools\.example") == 403
    assert refused_status(guard.check_origin, "https://x.tools.example", None, "127.0.0.1:7860",
                          trusted_regex="(unclosed") == 403


@pytest.mark.parametrize(("content_type", "status"), [
    ("application/json", None),
    ("application/json; charset=utf-8", None),
    ("Application/JSON", None),
    ("text/plain", 415),
    ("text/plain; charset=utf-8", 415),
    ("application/x-www-form-urlencoded", 415),
    ("multipart/form-data; boundary=x", 415),
    (None, 415),
])
def test_only_json_is_accepted(content_type, status):
    assert refused_status(guard.check_json_content_type, content_type) == status


def test_declared_length_over_the_limit_is_refused():
    assert refused_status(guard.check_content_length, str(guard.MAX_BODY_BYTES)) is None
    assert refused_status(guard.check_content_length, None) is None
    assert refused_status(guard.check_content_length, str(guard.MAX_BODY_BYTES + 1)) == 413
    assert refused_status(guard.check_content_length, "12abc") == 400


def test_body_reading_stops_at_the_limit():
    pulled = []

    async def endless():
        for index in range(10_000):
            pulled.append(index)
            yield b"x" * 1024

    with pytest.raises(RequestRefused) as err:
        asyncio.run(guard.read_bounded(endless(), limit=8 * 1024))
    assert err.value.status == 413 and len(pulled) == 9  # one chunk past the limit, not the 10 MB

    async def small():
        yield b'{"a": '
        yield b"1}"

    assert asyncio.run(guard.read_bounded(small())) == b'{"a": 1}'


def test_json_depth_ignores_brackets_in_strings():
    assert guard.json_depth('{"a": [1, {"b": []}]}') == 4
    assert guard.json_depth('{"a": "[[[[{{{{\\"[["}') == 1
    assert guard.json_depth("3") == 0


def test_parse_json_body_bounds_nesting_and_encoding():
    assert guard.parse_json_body(b'{"sample_prompts": ["a", "b"]}') == {"sample_prompts": ["a", "b"]}
    deep = b'{"sample_prompts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert refused_status(guard.parse_json_body, deep) == 400  # json.loads would raise RecursionError
    assert refused_status(guard.parse_json_body, b"\xff\xfe{}") == 400
    assert refused_status(guard.parse_json_body, b"{") == 400
