"""API key format, webhook signatures, secret sealing: what a caller and an attacker try."""

from __future__ import annotations

import secrets

import pytest

from cave.auth import api_keys, sealing, webhooks
from cave.errors import AuthError, ConfigError, InvalidArgumentError

PEPPER = secrets.token_bytes(32)


def test_a_new_key_verifies_and_only_its_hash_is_kept() -> None:
    issued = api_keys.new_key(PEPPER)
    key_id, secret = api_keys.parse(issued.plaintext)
    assert key_id == issued.key_id
    assert issued.plaintext.startswith("cave_live_")
    assert secret not in issued.secret_hash
    assert api_keys.secret_matches(secret, issued.secret_hash, PEPPER)
    assert not api_keys.secret_matches(secret, issued.secret_hash, secrets.token_bytes(32))
    other = "B" if secret.endswith("A") else "A"  # a secret that differs in its last character
    assert not api_keys.secret_matches(secret[:-1] + other, issued.secret_hash, PEPPER)


def test_masked_keys_show_the_id_and_four_characters() -> None:
    issued = api_keys.new_key(PEPPER)
    assert issued.masked == f"cave_live_{issued.key_id}_****{issued.plaintext[-4:]}"
    assert api_keys.mask(issued.key_id) == f"cave_live_{issued.key_id}_****"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "Bearer x",
        "cave_live_",
        "cave_test_aaaaaaaaaaaa_" + "a" * 43,
        "cave_live_AAAAAAAAAAAA_" + "a" * 43,
        "cave_live_aaaaaaaaaaaa_" + "a" * 42,
    ],
)
def test_malformed_keys_are_refused_alike(bad: str) -> None:
    with pytest.raises(AuthError, match="malformed API key"):
        api_keys.parse(bad)


def test_two_keys_never_share_id_or_secret() -> None:
    keys = [api_keys.new_key(PEPPER) for _ in range(200)]
    assert len({k.key_id for k in keys}) == len({k.plaintext for k in keys}) == 200


SECRET = b"webhook-secret"


def test_the_standard_webhooks_reference_example_verifies() -> None:
    # The example of the Standard Webhooks reference libraries: same headers, same signature.
    secret, body = b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", b'{"test": 2432232314}'
    headers = webhooks.sign(body, secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", now=1614265330)
    assert headers == {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }
    assert webhooks.verify(headers, body, secret, now=1614265330).event_id.startswith("msg_")


def test_a_signed_webhook_verifies_whatever_the_header_case() -> None:
    headers = webhooks.sign(b'{"a":1}', SECRET, "evt-1", now=1_000_000)
    upper = {k.upper(): v for k, v in headers.items()}
    verified = webhooks.verify(upper, b'{"a":1}', SECRET, now=1_000_010)
    assert (verified.event_id, verified.timestamp) == ("evt-1", 1_000_000)


def test_one_of_several_signatures_is_enough() -> None:
    headers = webhooks.sign(b"{}", SECRET, "evt-rot", now=1_000_000)
    old = webhooks.sign(b"{}", b"old-secret", "evt-rot", now=1_000_000)[webhooks.SIGNATURE_HEADER]
    headers[webhooks.SIGNATURE_HEADER] = f"v1a,xyz {old} {headers[webhooks.SIGNATURE_HEADER]}"
    assert webhooks.verify(headers, b"{}", SECRET, now=1_000_000).event_id == "evt-rot"


@pytest.mark.parametrize(
    ("body", "secret", "now", "reason"),
    [
        (b'{"a":2}', SECRET, 1_000_010, "does not match"),
        (b'{"a":1}', b"other", 1_000_010, "does not match"),
        (b'{"a":1}', SECRET, 1_000_000 + 301, "more than 300 s"),
        (b'{"a":1}', SECRET, 1_000_000 - 301, "more than 300 s"),
    ],
    ids=["changed-body", "wrong-secret", "stale", "from-the-future"],
)
def test_forged_or_stale_webhooks_are_refused(
    body: bytes, secret: bytes, now: int, reason: str
) -> None:
    headers = webhooks.sign(b'{"a":1}', SECRET, "evt-2", now=1_000_000)
    with pytest.raises(webhooks.WebhookSignatureError, match=reason):
        webhooks.verify(headers, body, secret, now=now)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"webhook-timestamp": "1", "webhook-signature": "v1,abc"},
        {"webhook-id": "e", "webhook-signature": "v1,abc"},
        {"webhook-id": "e", "webhook-timestamp": "1"},
        {"webhook-id": "e", "webhook-timestamp": "x", "webhook-signature": "v1,abc"},
        {"webhook-id": "e", "webhook-timestamp": "１", "webhook-signature": "v1,abc"},
        {"webhook-id": "e", "webhook-timestamp": "1", "webhook-signature": "v2,abc"},
        {"webhook-id": "e" * 256, "webhook-timestamp": "1", "webhook-signature": "v1,abc"},
    ],
    ids=["none", "no-id", "no-time", "no-sig", "bad-time", "unicode-digit", "v2", "long-id"],
)
def test_malformed_signature_headers_are_refused(headers: dict[str, str]) -> None:
    with pytest.raises(webhooks.WebhookSignatureError):
        webhooks.verify(headers, b"{}", SECRET, now=1)


@pytest.mark.parametrize("field", ["webhook-id", "webhook-timestamp"])
def test_the_event_id_and_the_time_are_signed(field: str) -> None:
    headers = webhooks.sign(b"{}", SECRET, "evt-3", now=1_000_000)
    headers[field] = {"webhook-id": "evt-4", "webhook-timestamp": "1000100"}[field]
    with pytest.raises(webhooks.WebhookSignatureError, match="does not match"):
        webhooks.verify(headers, b"{}", SECRET, now=1_000_100)


KEY = secrets.token_bytes(32)


def test_sealed_secrets_open_only_with_their_key_and_row() -> None:
    sealed = sealing.seal(KEY, "cave_live_secret", context="sandbox-1")
    assert "cave_live_secret" not in sealed
    assert sealing.unseal(KEY, sealed, context="sandbox-1") == "cave_live_secret"
    with pytest.raises(InvalidArgumentError):
        sealing.unseal(KEY, sealed, context="sandbox-2")
    with pytest.raises(InvalidArgumentError):
        sealing.unseal(secrets.token_bytes(32), sealed, context="sandbox-1")
    assert sealing.seal(KEY, "x", "c") != sealing.seal(KEY, "x", "c")  # fresh nonce each time


def test_a_short_secret_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="CAVE_SECRET_KEY"):
        sealing.seal(b"short", "x", "c")
