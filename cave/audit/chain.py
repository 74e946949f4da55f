"""The signed line format: canonical JSON, its HMAC-SHA256, and the chain through `prev`."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from cave.errors import InvalidArgumentError

FORMAT_VERSION = 1
GENESIS = "0" * 64  # the `prev` of the very first line of a log

# No circular check (a third of the cost): a cycle ends in RecursionError, caught below.
_encode = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
).encode


def canonical(fields: dict[str, Any]) -> bytes:
    """The bytes the MAC covers: sorted keys, no spaces, UTF-8, no NaN."""
    try:
        return _encode(fields).encode()
    except (TypeError, ValueError, RecursionError) as exc:  # a set, NaN, a lone surrogate, a cycle
        raise InvalidArgumentError(f"audit event is not JSON-able: {exc}") from None


class Signer:
    """HMAC-SHA256 with one key, the key's pads hashed once (a third of `hmac.digest`'s cost)."""

    def __init__(self, key: bytes) -> None:
        block = hashlib.sha256(key).digest() if len(key) > 64 else key  # RFC 2104
        block = block.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(byte ^ 0x36 for byte in block))
        self._outer = hashlib.sha256(bytes(byte ^ 0x5C for byte in block))

    def mac(self, payload: bytes) -> str:
        inner = self._inner.copy()
        inner.update(payload)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()

    def matches(self, record: dict[str, Any]) -> bool:
        """Whether the record's `mac` is the HMAC of the rest of it."""
        rest = {name: value for name, value in record.items() if name != "mac"}
        try:
            expected = self.mac(canonical(rest))
        except InvalidArgumentError:  # e.g. NaN parsed from a forged line
            return False
        return hmac.compare_digest(expected, str(record["mac"]))

    def seal(self, fields: dict[str, Any], seq: int, prev: str) -> tuple[bytes, str]:
        """The complete line (newline included) for `fields` at `seq` after `prev`, and its MAC.

        Adds v, seq and prev to `fields` itself.
        """
        fields.update(v=FORMAT_VERSION, seq=seq, prev=prev)
        payload = canonical(fields)
        mac = self.mac(payload)
        # Stored: the payload with `mac` appended last; a verifier drops it and re-canonicalises.
        return b'%s,"mac":"%s"}\n' % (payload[:-1], mac.encode()), mac


def parse(line: bytes) -> dict[str, Any] | None:
    """The JSON object on `line`, or None when it is not one."""
    try:
        value = json.loads(line)
    except ValueError:  # also UnicodeDecodeError
        return None
    return value if isinstance(value, dict) else None


def is_audit_line(record: dict[str, Any]) -> bool:
    return (
        isinstance(record.get("mac"), str)
        and isinstance(record.get("prev"), str)
        and type(record.get("seq")) is int
    )
