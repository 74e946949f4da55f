"""Masking of personal data and secrets (BKG_SCRUB_LOGS) in audit details and log records."""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

MASK = "***"

_Replacement = str | Callable[[re.Match[str]], str]


def _api_key(match: re.Match[str]) -> str:
    return f"{match[1]}{MASK}{match[0][-4:]}"


def _ipv6(match: re.Match[str]) -> str:
    text = match[0]
    address = text.rstrip(".")  # the end of a sentence, not of the address
    try:
        ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return text  # a time of day, a MAC address, ...
    if address.strip(":") == "":
        return text  # a bare "::" is punctuation more often than an address
    return MASK + text[len(address) :]


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"

# In this order: a bearer token may be a JWT or one of our keys, and it goes as a whole.
_RULES: list[tuple[re.Pattern[str], _Replacement]] = [
    (re.compile(r"\b(Bearer)\s+[A-Za-z0-9\-._~+/]+=*", re.IGNORECASE), rf"\1 {MASK}"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*"), MASK),
    (re.compile(r"\b(cave_(?:live|test)_)[A-Za-z0-9_-]{8,}"), _api_key),
    (
        re.compile(r"[A-Za-z0-9._%+-]+@((?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,})\b"),
        rf"{MASK}@\1",
    ),
    (
        re.compile(
            r"(?<![\w:.])(?=[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:)[0-9A-Fa-f:.]{2,45}(?:%[\w.]+)?(?![\w:])"
        ),
        _ipv6,
    ),
    (re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)"), MASK),
]

# Keys whose whole value is a secret, by how their name ends: `db_password`, `X-Api-Key`,
# `accessToken`; not `prompt_tokens` or `token_id`.
_SECRET_KEY = re.compile(
    r"(password|passwd|secret|token|api_?key|authorization|cookie|credentials?)$"
)


def scrub_text(text: str) -> str:
    """`text` with e-mail addresses, tokens, keys and IP addresses masked."""
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


def is_secret_key(name: str) -> bool:
    return bool(_SECRET_KEY.search(name.lower().replace("-", "_")))


def scrub(value: Any) -> Any:
    """A copy of `value` with every string in it scrubbed and the values of secret keys masked."""
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, Mapping):
        return {
            key: MASK if isinstance(key, str) and is_secret_key(key) else scrub(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [scrub(item) for item in value]
    return value


class ScrubFilter(logging.Filter):
    """Scrubs each record's message (its arguments merged in), exception text and stack.

    Attach it to handlers (`handler.addFilter(ScrubFilter())`): a logger's own filters do not see
    records that propagate from its children.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        # Merged first: an argument's str() may hold what its type alone does not show.
        record.msg = scrub_text(record.getMessage())
        record.args = ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub_text(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub_text(record.stack_info)
        return True
