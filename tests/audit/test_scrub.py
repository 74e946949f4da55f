"""BKG_SCRUB_LOGS: what scrub() masks and what it keeps, in strings, structures and log records."""

from __future__ import annotations

import io
import logging

import pytest

from cave.audit import ScrubFilter, scrub

MASKED = [
    ("mail alice.smith+tag@example.com now", "mail ***@example.com now"),
    ("Authorization: Bearer abc.def-ghi==", "Authorization: Bearer ***"),
    ("bearer cave_live_AbCdEf0123456789wxyz", "bearer ***"),
    ("key cave_live_AbCdEf0123456789wxyz used", "key cave_live_***wxyz used"),
    ("cave_test_Zz9_8-7abcd1234", "cave_test_***1234"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig_abc-123 end", "jwt *** end"),
    ("from 192.168.1.20:8080.", "from ***:8080."),
    ("ipv6 2001:db8::1 and [::1]:80 and fe80::1%eth0", "ipv6 *** and [***]:80 and ***"),
    ("mapped ::ffff:10.0.0.1", "mapped ***"),
]

KEPT = [
    "sandbox sbx_0042 exited 0 after 12.5 s at 12:30:45",
    "2026-11-27T09:15:02.123456Z",
    "version 1.2.3, and 1.2.3.4.5 is not an address, nor is 999.1.1.1",
    "www.example.com a.b.c std::vector ::",
    "mac 00:1a:2b:3c:4d:5e",
    "id 4b780383a4c94aa59a8b4fc891658b0b",
    "the prefix cave_live_ alone",
    "user@localhost",  # no dot in the domain: not taken for an address
]


@pytest.mark.parametrize(("text", "expected"), MASKED)
def test_masked(text: str, expected: str) -> None:
    assert scrub(text) == expected
    assert scrub(expected) == expected  # scrubbing twice changes nothing


@pytest.mark.parametrize("text", KEPT)
def test_kept(text: str) -> None:
    assert scrub(text) == text


def test_structures_and_secret_keys() -> None:
    details = {
        "password": "hunter2",
        "db_password": "x",
        "X-Api-Key": "k",
        "accessToken": {"nested": "anything"},
        "client_secret": 42,
        "prompt_tokens": 5,  # a count, not a token
        "token_id": "tok_1",  # an id, not a secret
        "note": ["ping bob@corp.io", 3, None, True, 1.5],
        "headers": {"Authorization": "Bearer x", "Host": "10.0.0.7"},
        "argv": ("curl", "http://10.0.0.7/"),
    }
    assert scrub(details) == {
        "password": "***",
        "db_password": "***",
        "X-Api-Key": "***",
        "accessToken": "***",
        "client_secret": "***",
        "prompt_tokens": 5,
        "token_id": "tok_1",
        "note": ["ping ***@corp.io", 3, None, True, 1.5],
        "headers": {"Authorization": "***", "Host": "***"},
        "argv": ["curl", "http://***/"],
    }
    assert details["password"] == "hunter2"  # a copy: the caller's data is left alone


def test_scrub_filter_masks_messages_arguments_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ScrubFilter())
    logger = logging.getLogger("tests.audit.scrub")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("login of %s from %s", "bob@corp.io", "10.1.2.3")
        logger.warning("header %(auth)s", {"auth": "Bearer sekrit"})
        try:
            raise ValueError("bad key cave_live_AbCdEf0123456789wxyz")
        except ValueError:
            logger.exception("failed for carol@example.org")
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert "login of ***@corp.io from ***\n" in output
    assert "header Bearer ***\n" in output
    assert "failed for ***@example.org\n" in output
    assert "ValueError: bad key cave_live_***wxyz" in output
    for secret in ("bob@", "10.1.2.3", "sekrit", "AbCdEf", "carol"):
        assert secret not in output
