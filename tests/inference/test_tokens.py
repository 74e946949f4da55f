"""Model-access tokens: what is issued, the attack matrix at the verifier, peers, settings."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cave.auth.keys import ForbiddenError
from cave.db import Database, load_database_settings, new_id
from cave.errors import (
    AuthError,
    ConfigError,
    InvalidArgumentError,
    LimitExceededError,
    NamespaceMismatchError,
    TokenExpiredError,
    TokenRevokedError,
)
from config.llm import DEFAULT_RPM, DEFAULT_TPM, LlmSettings, load_llm_settings
from inference.revocation import RevocationCache
from inference.signing_keys import ActiveSigningKey, SigningKeys
from inference.tokens import ModelClaims, PeerKeys, TokenSigner, TokenVerifier

pytestmark = pytest.mark.anyio

NS, MODEL = "ns-a", "tiny-chat"


@pytest.fixture
def backend() -> str:
    """The verifier never reads the database: one backend is enough here."""
    return "sqlite"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _part(value: dict[str, Any]) -> str:
    return _b64(json.dumps(value).encode())


@dataclass
class Forge:
    """Builds tokens by hand, byte by byte, with the deployment's real signing key."""

    key: ActiveSigningKey

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": "cave",
            "aud": "cave-llm",
            "sub": "key-1",
            "model_id": MODEL,
            "cave_ns": NS,
            "scopes": ["llm:chat"],
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "jti": new_id(),
        }
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}  # None: leave it out

    def header(self, **changes: Any) -> dict[str, Any]:
        header = {"alg": "EdDSA", "typ": "at+jwt", "kid": self.key.kid, **changes}
        return {k: v for k, v in header.items() if v is not None}

    def token(
        self,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
        sign: Callable[[bytes], bytes] | None = None,
    ) -> str:
        signing_input = f"{_part(header or self.header())}.{_part(claims or self.claims())}"
        sign = sign or self.key.private_key.sign
        return f"{signing_input}.{_b64(sign(signing_input.encode()))}"

    @property
    def public_bytes(self) -> bytes:
        return self.key.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@pytest.fixture
async def forge(keys: SigningKeys) -> Forge:
    return Forge(await keys.current())


def _hs256(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda data: hmac.new(secret, data, hashlib.sha256).digest()


def _rs256(data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return private.sign(data, padding.PKCS1v15(), hashes.SHA256())


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["model_id"] = "the-big-one"
    return f"{header}.{_part(claims)}.{signature}"


def _signed(forge: Forge, header: str, payload: str) -> str:
    """Segments as given, signed with the real key."""
    signature = forge.key.private_key.sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_b64(signature)}"


def _respell(token: str) -> str:
    """The same token with its signature's last character changed in the bits base64 pads
    with: the same 64 bytes, spelled another way."""
    head, _, signature = token.rpartition(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    return f"{head}.{signature[:-1]}{alphabet[last ^ 0b0001]}"


HOUR = 3600
CHAT = (NS, MODEL, "llm:chat")  # what verify is asked: namespace, model, scope


@dataclass(frozen=True)
class Attack:
    name: str
    make: Callable[[Forge], str]
    expected: type[AuthError]  # the error a caller sees; its code picks 401 or 403
    reason: str  # why, in the message: each case must fail for its own reason
    args: tuple[str, str, str] = CHAT


def _ago(seconds: int) -> int:
    return int(time.time()) - seconds


ATTACKS = [
    Attack(
        "expired",
        lambda f: f.token(claims=f.claims(iat=_ago(2 * HOUR), nbf=_ago(2 * HOUR), exp=_ago(HOUR))),
        TokenExpiredError,
        "has expired",
    ),
    Attack(
        "not yet valid",
        lambda f: f.token(claims=f.claims(nbf=_ago(-HOUR))),
        AuthError,
        "not valid yet",
    ),
    Attack(
        "issued in the future",
        lambda f: f.token(claims=f.claims(iat=_ago(-HOUR))),
        AuthError,
        "not valid yet",
    ),
    Attack("tampered payload", lambda f: _tamper(f.token()), AuthError, "signature does not"),
    Attack(
        "signed by another key under our kid",
        lambda f: f.token(sign=Ed25519PrivateKey.generate().sign),
        AuthError,
        "signature does not verify",
    ),
    Attack(
        "alg none",
        lambda f: f.token(header=f.header(alg="none"), sign=lambda data: b""),
        AuthError,
        "algorithm must be EdDSA",
    ),
    Attack(
        "HS256 with the public key as HMAC secret",
        lambda f: f.token(header=f.header(alg="HS256"), sign=_hs256(f.public_bytes)),
        AuthError,
        "algorithm must be EdDSA",
    ),
    Attack(
        "HS256 with the JWK x as HMAC secret",
        lambda f: f.token(header=f.header(alg="HS256"), sign=_hs256(_b64(f.public_bytes).encode())),
        AuthError,
        "algorithm must be EdDSA",
    ),
    Attack(
        "RS256",
        lambda f: f.token(header=f.header(alg="RS256"), sign=_rs256),
        AuthError,
        "algorithm must be EdDSA",
    ),
    Attack(
        "unknown kid",
        lambda f: f.token(header=f.header(kid=new_id())),
        AuthError,
        "unknown or expired key",
    ),
    Attack("no kid", lambda f: f.token(header=f.header(kid=None)), AuthError, "no signing key"),
    Attack(
        "a negative rate limit",
        lambda f: f.token(claims=f.claims(cave_rpm=-1)),
        AuthError,
        "limits must be whole numbers",
    ),
    Attack(
        "a rate limit that is no number",
        lambda f: f.token(claims=f.claims(cave_tpm="unlimited")),
        AuthError,
        "limits must be whole numbers",
    ),
    Attack(
        "wrong audience",
        lambda f: f.token(claims=f.claims(aud="someone-else")),
        AuthError,
        "another audience",
    ),
    Attack(
        "wrong issuer",
        lambda f: f.token(claims=f.claims(iss="evil")),
        AuthError,
        "another issuer",
    ),
    Attack(
        "wrong namespace",
        lambda f: f.token(),
        NamespaceMismatchError,
        "for namespace 'ns-a', not 'ns-b'",
        ("ns-b", MODEL, "llm:chat"),
    ),
    Attack(
        "wrong model",
        lambda f: f.token(),
        ForbiddenError,
        "for model 'tiny-chat', not 'the-big-one'",
        (NS, "the-big-one", "llm:chat"),
    ),
    Attack(
        "missing scope",
        lambda f: f.token(),
        ForbiddenError,
        "lacks the scope 'llm:admin'",
        (NS, MODEL, "llm:admin"),
    ),
    Attack("typ missing", lambda f: f.token(header=f.header(typ=None)), AuthError, "type must"),
    Attack("typ JWT", lambda f: f.token(header=f.header(typ="JWT")), AuthError, "type must"),
    Attack(
        "critical header",
        lambda f: f.token(header=f.header(crit=["exp"])),
        AuthError,
        "critical header",
    ),
    Attack("no exp", lambda f: f.token(claims=f.claims(exp=None)), AuthError, "lacks the claim"),
    Attack(
        "no cave_ns",
        lambda f: f.token(claims=f.claims(cave_ns=None)),
        AuthError,
        "lacks the claims ['cave_ns']",
    ),
    Attack(
        "scopes not a list",
        lambda f: f.token(claims=f.claims(scopes="llm:chat")),
        AuthError,
        "scopes must be a list",
    ),
    Attack(
        "exp not a number",
        lambda f: f.token(claims=f.claims(exp="tomorrow")),
        AuthError,
        "times must be seconds",
    ),
    Attack(
        "lives longer than any key issued here",
        lambda f: f.token(claims=f.claims(exp=_ago(-365 * 86400))),
        AuthError,
        "lives longer",
    ),
    Attack(
        "a second spelling of the signature (non-canonical base64)",
        lambda f: _respell(f.token()),
        AuthError,
        "malformed",
    ),
    Attack("padding", lambda f: f.token() + "==", AuthError, "malformed"),
    Attack("junk in a segment", lambda f: "!" + f.token(), AuthError, "malformed"),
    Attack(
        "a payload that is no JSON object",
        lambda f: _signed(f, _part(f.header()), _b64(b"[1]")),
        AuthError,
        "malformed",
    ),
    Attack(
        "an audience list without ours",
        lambda f: f.token(claims=f.claims(aud=["someone-else", "another"])),
        AuthError,
        "another audience",
    ),
    Attack("not a JWT", lambda f: "not-a-token", AuthError, "malformed"),
    Attack("four parts", lambda f: f.token() + ".x", AuthError, "malformed"),
    Attack("huge", lambda f: "a" * 100_000 + ".b.c", AuthError, "malformed"),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
async def test_the_verifier_refuses(attack: Attack, forge: Forge, verifier: TokenVerifier) -> None:
    token = attack.make(forge)
    with pytest.raises(AuthError) as caught:
        verifier.verify(token, *attack.args)
    # The code is what the API reports (and picks 401 or 403 by): it must be exactly this one.
    assert caught.value.code == attack.expected.code
    assert isinstance(caught.value, attack.expected)
    assert attack.reason in str(caught.value)
    with pytest.raises(attack.expected):  # waiting for a reload of the keys changes nothing
        await verifier.averify(token, *attack.args)


async def test_a_revoked_key_is_refused(
    signer: TokenSigner, verifier: TokenVerifier, revocations: RevocationCache
) -> None:
    token, claims = signer.issue("key-1", MODEL, NS, ["llm:chat"], 600)
    assert verifier.verify(token, NS, MODEL) == claims  # verified once, and remembered
    revocations.revoke_local(claims.jti)
    with pytest.raises(TokenRevokedError):
        verifier.verify(token, NS, MODEL)


async def test_an_issued_key_says_who_may_call_what(
    signer: TokenSigner, verifier: TokenVerifier, keys: SigningKeys
) -> None:
    jti = new_id()
    before = int(time.time())
    token, claims = signer.issue("key-1", MODEL, NS, ["llm:chat"], 600, jti=jti)
    kid = (await keys.current()).kid
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "typ": "at+jwt", "kid": kid}
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload == {
        "iss": "cave",
        "aud": "cave-llm",
        "sub": "key-1",
        "model_id": MODEL,
        "cave_ns": NS,
        "scopes": ["llm:chat"],
        "iat": claims.iat,
        "nbf": claims.iat,
        "exp": claims.iat + 600,
        "jti": jti,
        "cave_rpm": DEFAULT_RPM,  # limited by default, and signed: nobody edits them
        "cave_tpm": DEFAULT_TPM,
    }
    assert before <= claims.iat <= int(time.time())
    assert (claims.jti, claims.kid, claims.scopes) == (jti, kid, ("llm:chat",))
    assert verifier.verify(token, NS, MODEL, "llm:chat") == claims
    assert verifier.verify(token, None, None) == claims  # None: the caller checks nothing there


async def test_a_key_expired_within_the_leeway_still_works(
    forge: Forge, verifier: TokenVerifier
) -> None:
    now = int(time.time())
    token = forge.token(claims=forge.claims(iat=now - 600, nbf=now - 600, exp=now - 5))
    assert verifier.verify(token, NS, MODEL).exp == now - 5


async def test_a_remembered_key_is_refused_once_it_expires(
    keys: SigningKeys, revocations: RevocationCache, signer: TokenSigner
) -> None:
    now = [time.time()]
    verifier = TokenVerifier(keys, revocations, LlmSettings(), clock=lambda: now[0])
    token, claims = signer.issue("key-1", MODEL, NS, ["llm:chat"], 60)
    assert verifier.verify(token, NS, MODEL) == claims
    now[0] = claims.exp + 29  # within the leeway
    assert verifier.verify(token, NS, MODEL) == claims
    now[0] = claims.exp + 30
    with pytest.raises(TokenExpiredError):
        verifier.verify(token, NS, MODEL)


async def test_issue_refuses_what_no_token_may_say(signer: TokenSigner) -> None:
    with pytest.raises(LimitExceededError):
        signer.issue("key-1", MODEL, NS, ["llm:chat"], 31 * 86400)
    for ttl in (0, -5):
        with pytest.raises(InvalidArgumentError):
            signer.issue("key-1", MODEL, NS, ["llm:chat"], ttl)
    with pytest.raises(InvalidArgumentError):
        signer.issue("key-1", MODEL, NS, [])
    with pytest.raises(InvalidArgumentError):
        signer.issue("key-1", "", NS, ["llm:chat"])
    _, claims = signer.issue("key-1", MODEL, NS, ["llm:chat"])
    assert claims.exp - claims.iat == 3600  # CAVE_LLM_TOKEN_TTL_S
    for limit in (-1, 10**10, True, 1.5):
        with pytest.raises(InvalidArgumentError, match="rpm"):
            signer.issue("key-1", MODEL, NS, ["llm:chat"], rpm=limit)  # type: ignore[arg-type]


async def test_a_key_without_limit_claims_verifies_and_gets_the_gateways_defaults(
    forge: Forge, verifier: TokenVerifier, signer: TokenSigner
) -> None:
    claims = verifier.verify(forge.token(), *CHAT)  # a peer's, or one issued before limits
    assert (claims.rpm, claims.tpm) == (None, None)
    _, granted = signer.issue("key-1", MODEL, NS, ["llm:chat"], rpm=0, tpm=7)
    assert (granted.rpm, granted.tpm) == (0, 7)  # 0: no limit, an admin's grant


async def test_a_key_rotated_on_another_replica_verifies_after_a_reload(
    db: Database,
    secret_key: bytes,
    llm_settings: LlmSettings,
    revocations: RevocationCache,
) -> None:
    here = SigningKeys(db, secret_key, llm_settings, miss_refresh_s=0)
    await here.current()
    verifier = TokenVerifier(here, revocations, llm_settings)
    elsewhere = SigningKeys(db, secret_key, llm_settings)
    await elsewhere.rotate()
    token, claims = TokenSigner(elsewhere, llm_settings).issue("key-1", MODEL, NS, ["llm:chat"])
    assert await verifier.averify(token, NS, MODEL) == claims


async def test_a_peer_clusters_keys_verify_once_its_jwks_is_trusted(
    keys: SigningKeys,
    revocations: RevocationCache,
    llm_settings: LlmSettings,
    secret_key: bytes,
    tmp_path: Path,
) -> None:
    peer_settings = LlmSettings(issuer="peer-east")
    peer_db = await Database.connect(load_database_settings({"BKG_DB_PATH": str(tmp_path / "p")}))
    try:
        peer_keys = SigningKeys(peer_db, secret_key, peer_settings)
        await peer_keys.current()
        token, claims = TokenSigner(peer_keys, peer_settings).issue("k", MODEL, NS, ["llm:chat"])
        jwks = await peer_keys.jwks()
    finally:
        await peer_db.close()
    peers = PeerKeys()
    verifier = TokenVerifier(keys, revocations, llm_settings, peers=peers)
    with pytest.raises(AuthError):
        verifier.verify(token, NS, MODEL)
    peers.set_jwks("peer-east", jwks)
    assert verifier.verify(token, NS, MODEL) == claims
    # The peer's key speaks for the peer only: not for us, not for another peer.
    forged = Forge(ActiveSigningKey(claims.kid, Ed25519PrivateKey.generate()))
    peers.set_jwks("peer-west", jwks)
    for issuer in ("cave", "peer-west"):
        with pytest.raises(AuthError):
            verifier.verify(forged.token(claims=forged.claims(iss=issuer)), NS, MODEL)
    peers.forget("peer-east")
    with pytest.raises(AuthError):
        verifier.verify(token, NS, MODEL)


def test_claims_round_trip_as_a_jwt_payload() -> None:
    claims = ModelClaims("cave", "cave-llm", "s", "m", "n", ("llm:chat",), 1, 1, 61, "j", "k")
    assert claims.payload()["scopes"] == ["llm:chat"]
    assert claims.expires_at.timestamp() == 61


def test_settings_defaults_and_environment() -> None:
    assert load_llm_settings({}) == LlmSettings(
        issuer="cave",
        audience="cave-llm",
        token_ttl_s=3600,
        token_max_ttl_s=30 * 86400,
        leeway_s=30,
    )
    env = {
        "CAVE_LLM_ISSUER": "cave-eu",
        "CAVE_LLM_AUDIENCE": "llm",
        "CAVE_LLM_TOKEN_TTL_S": "60",
        "CAVE_LLM_TOKEN_MAX_TTL_S": "120",
        "CAVE_LLM_LEEWAY_S": "0",
    }
    assert load_llm_settings(env) == LlmSettings(
        issuer="cave-eu", audience="llm", token_ttl_s=60, token_max_ttl_s=120, leeway_s=0
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CAVE_LLM_TOKEN_TTL_S", "an hour"),
        ("CAVE_LLM_TOKEN_TTL_S", "0"),
        ("CAVE_LLM_TOKEN_TTL_S", "1.5"),
        ("CAVE_LLM_TOKEN_MAX_TTL_S", "-1"),
        ("CAVE_LLM_LEEWAY_S", "-1"),
        ("CAVE_LLM_LEEWAY_S", "86400"),
        ("CAVE_LLM_ISSUER", " "),
        ("CAVE_LLM_AUDIENCE", "two words"),
        ("CAVE_LLM_TOKEN_TTL_S", "99999999"),  # longer than the maximum
    ],
)
def test_malformed_settings_name_their_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_llm_settings({variable: value})
    assert variable in str(caught.value)


async def test_an_audience_list_naming_ours_verifies(forge: Forge, verifier: TokenVerifier) -> None:
    token = forge.token(claims=forge.claims(aud=["someone-else", "cave-llm"]))
    assert verifier.verify(token, *CHAT).aud == "cave-llm"
