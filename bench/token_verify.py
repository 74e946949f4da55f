"""Model-access token verification with the revocation check, per core, next to its baselines.

Rows: a bare Ed25519 signature check (the floor: no JWT at all), pyjwt's HS256 decode of a
token with the same claims (the baseline: what a shared-secret JWT costs), pyjwt's EdDSA decode
alone, then TokenVerifier.verify on a new token each call (signature checked) and on a token
seen before (remembered: what an agent calling with its one key costs). Rates are per core:
operations per second of this process's CPU time; the target is 5,000 per second.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jwt

from cave.db import Database, load_database_settings, new_id
from config.llm import LlmSettings
from inference.revocation import RevocationCache
from inference.signing_keys import SigningKeys
from inference.tokens import TokenSigner, TokenVerifier

N = 5000
REVOKED = 10_000  # entries in the revocation set that every verification consults
TARGET_PER_S = 5000
NS, MODEL = "ns-bench", "bench-model"


def rate(label: str, fn: Callable[[int], object], n: int = N) -> tuple[str, float, float]:
    """(label, per-core ops/s by CPU time, wall µs per op); fn(i) is one operation."""
    for i in range(min(200, n)):
        fn(i)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(n):
        fn(i)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return label, n / cpu, wall / n * 1e6


async def main() -> None:
    settings = LlmSettings()
    with tempfile.TemporaryDirectory() as tmp:
        db = await Database.connect(load_database_settings({"BKG_DB_PATH": str(Path(tmp, "b"))}))
        # No reload mid-run: the table does not change while the bench runs.
        keys = SigningKeys(db, secrets.token_bytes(32), settings, refresh_s=3600)
        await keys.current()
        # The staleness check runs on every verify; the loop does not run in this synchronous
        # bench, so the view is read once and trusted for the run (the check costs the same).
        revocations = RevocationCache(db, max_age_s=3600)
        await revocations.refresh()
        for _ in range(REVOKED):
            revocations.revoke_local(new_id())
        signer = TokenSigner(keys, settings)
        tokens = [signer.issue("key-1", MODEL, NS, ["llm:chat"])[0] for _ in range(N + 200)]
        rows = measure(keys, revocations, settings, tokens)
        await db.close()
    report(rows)


def measure(
    keys: SigningKeys, revocations: RevocationCache, settings: LlmSettings, tokens: list[str]
) -> list[tuple[str, float, float]]:
    cold = TokenVerifier(keys, revocations, settings, cache_size=0)
    warm = TokenVerifier(keys, revocations, settings)
    claims = jwt.decode(tokens[0], options={"verify_signature": False})
    hs_secret = secrets.token_bytes(32)
    hs_token = jwt.encode(claims, hs_secret, algorithm="HS256")
    signing_input, _, signature = tokens[0].rpartition(".")
    raw_signature = base64.urlsafe_b64decode(signature + "==")
    public = keys.signer_now().private_key.public_key()

    def hs256(i: int) -> object:
        return jwt.decode(hs_token, hs_secret, algorithms=["HS256"], audience="cave-llm")

    rows = [
        rate(
            "Ed25519 verify, bare (floor)",
            lambda i: public.verify(raw_signature, signing_input.encode()),
        ),
        rate("pyjwt HS256 decode (baseline)", hs256),
        rate(
            "pyjwt EdDSA decode",
            lambda i: jwt.decode(tokens[i], public, algorithms=["EdDSA"], audience="cave-llm"),
        ),
        rate("TokenVerifier.verify, new token", lambda i: cold.verify(tokens[i], NS, MODEL)),
        rate("TokenVerifier.verify, remembered", lambda i: warm.verify(tokens[0], NS, MODEL)),
    ]
    return rows


def report(rows: list[tuple[str, float, float]]) -> None:
    floor, base = rows[0][1], rows[1][1]
    print(f"({REVOKED} revoked jtis in the set; per core = ops per CPU second of this process)")
    for label, per_s, wall_us in rows:
        ratios = f"x{per_s / base:.2f} of HS256, x{per_s / floor:.2f} of bare Ed25519"
        print(f"{label:34s} {per_s:9.0f}/s per core {wall_us:7.1f} us wall  {ratios}")
    for label, per_s, _ in rows[3:]:
        verdict = "met" if per_s >= TARGET_PER_S else "NOT met"
        print(f"target {TARGET_PER_S}/s per core, {label}: {verdict}")


if __name__ == "__main__":
    asyncio.run(main())
