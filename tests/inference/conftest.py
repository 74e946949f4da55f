"""Model-access fixtures: the database fixtures of tests/db (SQLite and PostgreSQL for every
test that asks for `db`), and the signing keys, revocation set, signer and verifier on top."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cave.db import Database
from config.llm import LlmSettings
from inference.revocation import RevocationCache
from inference.signing_keys import SigningKeys
from inference.tokens import TokenSigner, TokenVerifier
from tests.db.conftest import Target, anyio_backend, backend, pg_database, target  # noqa: F401


@pytest.fixture
async def db(target: Target) -> AsyncIterator[Database]:  # noqa: F811
    database = await Database.connect(target.settings)
    # tests/db empties its own tables between tests; signing_keys is not among them.
    await target.raw("DELETE FROM signing_keys")
    yield database
    await database.close()


# The tests below do not run the refresh loop: a view read at the start of a test must stay
# trusted for the whole test, however loaded the machine (the staleness tests set their own).
REVOCATION_MAX_AGE_S = 300.0


@pytest.fixture
def llm_settings() -> LlmSettings:
    return LlmSettings()


@pytest.fixture
def secret_key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
async def keys(db: Database, secret_key: bytes, llm_settings: LlmSettings) -> SigningKeys:
    """The deployment's signing keys, loaded as a gateway does at start-up."""
    signing_keys = SigningKeys(db, secret_key, llm_settings)
    await signing_keys.current()
    return signing_keys


@pytest.fixture
async def revocations(db: Database, llm_settings: LlmSettings) -> RevocationCache:
    """Read once, as a gateway does at start-up: a view never read vouches for no token."""
    cache = RevocationCache(db, leeway_s=llm_settings.leeway_s, max_age_s=REVOCATION_MAX_AGE_S)
    await cache.refresh()
    return cache


@pytest.fixture
def signer(keys: SigningKeys, llm_settings: LlmSettings) -> TokenSigner:
    return TokenSigner(keys, llm_settings)


@pytest.fixture
def verifier(
    keys: SigningKeys, revocations: RevocationCache, llm_settings: LlmSettings
) -> TokenVerifier:
    return TokenVerifier(keys, revocations, llm_settings)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight chat model with its tokenizer, written by the tests (no download)."""
    from tests.inference.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def serve_for_handles(ray_cluster: None) -> Iterator[None]:
    """Serve on the session's cluster, for tests that call deployments through handles.

    A Serve that another module started (with its HTTP options) is used and left running. If
    none runs, it starts here without HTTP proxies and is shut down after this module, so that
    a later module's `serve.start` still gets the HTTP options it asks for.
    """
    from ray import serve
    from ray.serve.context import _get_global_client

    started_here = _get_global_client(raise_if_no_controller_running=False) is None
    if started_here:
        serve.start(proxy_location="Disabled")
    yield
    if started_here:
        serve.shutdown()
