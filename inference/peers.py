"""Peer clusters: the registry (a TOML file), their health, the JWKS trust, and forwarding a chat.

A peer is another CAVE cluster's gateway. This cluster forwards a chat for a model it does not
serve to the first healthy peer that lists it, with the caller's own model-access key; the peer
accepts that key because it trusts this cluster's issuer (it fetches our `/.well-known/jwks.json`
into its `PeerKeys`), as we trust each peer's issuer the same way. httpx errors stop here: callers
see InferenceUnavailableError only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from cave.errors import AuthError, CaveError, ConfigError, InferenceUnavailableError
from inference.tokens import PeerKeys

log = logging.getLogger("cave.peers")

COOLDOWN_S = 30.0  # a peer whose last request or probe failed is skipped this long
PROBE_INTERVAL_S = 10.0  # GET {url}/readyz of every peer
JWKS_INTERVAL_S = 60.0  # peers' public keys are fetched again this often
BACKOFF_MAX_S = 60.0  # a failing refresh loop waits 2, 4, 8... s between tries, at most this
NUDGE_MIN_INTERVAL_S = 2.0  # an unknown peer kid refetches the JWKS at most this often
TIMEOUT = httpx.Timeout(connect=3.0, read=120.0, write=10.0, pool=10.0)
_FIELDS = {"name", "url", "issuer", "models"}
_SETTINGS = {"probe_interval_s": PROBE_INTERVAL_S, "cooldown_s": COOLDOWN_S}


@dataclass(frozen=True, slots=True)
class Peer:
    """A peer cluster: its gateway's base URL, the `iss` of its keys, the models it serves."""

    name: str
    url: str
    issuer: str
    models: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PeersFile:
    """CAVE_PEERS_FILE: `probe_interval_s`, `cooldown_s` (optional) and `[[peers]]` tables."""

    peers: tuple[Peer, ...]
    probe_interval_s: float = PROBE_INTERVAL_S
    cooldown_s: float = COOLDOWN_S


def load_peers(path: str | Path, own_issuer: str) -> PeersFile:
    """The peers of a TOML file, in order; ConfigError when malformed."""
    where = f"CAVE_PEERS_FILE={str(path)!r}"
    try:
        document = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    unknown = sorted(set(document) - {"peers", *_SETTINGS})
    entries = document.get("peers", [])
    if unknown or not isinstance(entries, list):
        raise ConfigError(f"{where}: unknown keys {unknown or ['peers']}")
    settings = {name: document.get(name, default) for name, default in _SETTINGS.items()}
    for name, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{where}: {name} must be seconds > 0, got {value!r}")
    peers = tuple(_peer(entry, f"{where} peer #{i + 1}") for i, entry in enumerate(entries))
    names = [p.name for p in peers]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: peer names must be unique, got {names}")
    if any(p.issuer == own_issuer for p in peers):
        raise ConfigError(f"{where}: a peer cannot share this cluster's issuer {own_issuer!r}")
    return PeersFile(peers, float(settings["probe_interval_s"]), float(settings["cooldown_s"]))


def _peer(entry: object, where: str) -> Peer:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table")
    if set(entry) != _FIELDS:
        raise ConfigError(f"{where}: expected exactly the keys {sorted(_FIELDS)}")
    name, url, issuer, models = (entry[k] for k in ("name", "url", "issuer", "models"))
    if not all(isinstance(v, str) and v.strip() == v and v for v in (name, url, issuer)):
        raise ConfigError(f"{where}: name, url and issuer must be non-empty strings")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise ConfigError(f"{where}: url {url!r} must be an http(s) base URL")
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise ConfigError(f"{where}: models must be a list of model ids")
    return Peer(name, url.rstrip("/"), issuer, tuple(models))


class PeerHealth:
    """A circuit breaker per peer: healthy unless its last request or probe failed within
    `cooldown_s`; a success closes it again."""

    def __init__(
        self, cooldown_s: float = COOLDOWN_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._failed_at: dict[str, float] = {}

    def healthy(self, name: str) -> bool:
        failed_at = self._failed_at.get(name)
        return failed_at is None or self._clock() - failed_at >= self._cooldown_s

    def failed(self, name: str) -> None:
        self._failed_at[name] = self._clock()

    def succeeded(self, name: str) -> None:
        self._failed_at.pop(name, None)


class _PeerFailure(InferenceUnavailableError):
    """One peer could not serve a request; `down` says whether it counts against its health."""

    def __init__(self, message: str, down: bool) -> None:
        super().__init__(message)
        self.args = (message, down)
        self.down = down


class PeerRouter:
    """Forwards chats to peers with failover, and keeps their health and public keys fresh."""

    def __init__(
        self,
        peers: Iterable[Peer],
        trusted: PeerKeys,
        health: PeerHealth | None = None,
        client: httpx.AsyncClient | None = None,
        probe_interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        self.peers = tuple(peers)
        self.probe_interval_s = probe_interval_s
        self.trusted = trusted
        self.health = health or PeerHealth()
        self._client = client or httpx.AsyncClient(timeout=TIMEOUT)
        self._nudge = asyncio.Event()
        self._nudged_at = float("-inf")

    def models(self) -> set[str]:
        return {m for p in self.peers for m in p.models}

    def candidates(self, model: str) -> list[Peer]:
        """The healthy peers listing `model`, in the file's order."""
        return [p for p in self.peers if model in p.models and self.health.healthy(p.name)]

    async def stream(
        self, model: str, token: str, namespace: str, payload: Mapping[str, Any]
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(peer name, ChatDelta dict) pairs from the first peer that answers. A failure before
        the first delta tries the next peer; one after it raises InferenceUnavailableError."""
        reasons: list[str] = []
        for peer in self.candidates(model):
            started = False
            try:
                async for delta in self._chat(peer, token, namespace, payload):
                    if not started and reasons:  # told once: the peers passed over, and why
                        delta = {**delta, "peer_failures": list(reasons)}
                    started = True
                    yield peer.name, delta
            except _PeerFailure as failure:
                if failure.down or started:
                    self.health.failed(peer.name)
                if started:
                    raise InferenceUnavailableError(
                        f"peer {peer.name} failed mid-stream: {failure.message}"
                    ) from None
                reasons.append(f"{peer.name}: {failure.message}")
                continue
            self.health.succeeded(peer.name)
            return
        tried = "; ".join(reasons) or "none is healthy"
        raise InferenceUnavailableError(f"no peer could serve model {model!r} ({tried})")

    async def _chat(
        self, peer: Peer, token: str, namespace: str, payload: Mapping[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token}", "X-Cave-Namespace": namespace}
        url = f"{peer.url}/v1/chat/completions"
        try:
            async with self._client.stream("POST", url, json=payload, headers=headers) as answer:
                if answer.status_code != 200:
                    body = (await answer.aread()).decode(errors="replace")
                    raise _PeerFailure(
                        f"HTTP {answer.status_code} {_error_message(body)}".strip(),
                        down=answer.status_code >= 500,
                    )
                async for delta in _deltas(answer.aiter_lines()):
                    yield delta
        except httpx.HTTPError as exc:  # connect error, timeout, broken stream: the boundary
            raise _PeerFailure(f"{type(exc).__name__}: {exc}", down=True) from None

    def nudge(self) -> None:
        """A token named a kid we do not know: fetch the peers' keys soon (rate-limited)."""
        now = time.monotonic()
        if self.peers and now - self._nudged_at >= NUDGE_MIN_INTERVAL_S:
            self._nudged_at = now
            self._nudge.set()

    async def run(self) -> None:
        """Probes every peer's /readyz each `probe_interval_s` and fetches its JWKS each
        JWKS_INTERVAL_S, or at once when nudged."""
        keys_due, probe_due = 0.0, time.monotonic() + self.probe_interval_s
        failures = 0
        while True:  # peers start healthy: the first probe comes after one interval
            try:
                if time.monotonic() >= keys_due or self._nudge.is_set():
                    self._nudge.clear()
                    await self.refresh_keys()
                    keys_due = time.monotonic() + JWKS_INTERVAL_S
                if time.monotonic() >= probe_due:
                    await self.probe()
                    probe_due = time.monotonic() + self.probe_interval_s
                failures = 0
            except Exception:  # the loop must outlive every failure: back off, then go on
                failures += 1
                delay = min(BACKOFF_MAX_S, 2.0**failures)
                log.exception("peers: refresh failed %d time(s), retry in %.0f s", failures, delay)
                await asyncio.sleep(delay)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudge.wait(), self.probe_interval_s)

    async def probe(self) -> None:
        await asyncio.gather(*(self._probe(p) for p in self.peers))

    async def refresh_keys(self) -> None:
        await asyncio.gather(*(self._refresh(p) for p in self.peers))

    async def _probe(self, peer: Peer) -> None:
        try:
            answer = await self._client.get(f"{peer.url}/readyz", timeout=5.0)
            ok = answer.status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok:
            self.health.succeeded(peer.name)
        else:
            self.health.failed(peer.name)

    async def _refresh(self, peer: Peer) -> None:
        # A failed fetch keeps the keys we had: their tokens expire on their own.
        try:
            answer = await self._client.get(f"{peer.url}/.well-known/jwks.json", timeout=5.0)
            answer.raise_for_status()
            self.trusted.set_jwks(peer.issuer, answer.json())
        except (httpx.HTTPError, ValueError, CaveError, AttributeError, TypeError) as exc:
            # AttributeError, TypeError: a JSON document that is not an object (a list, a string)
            log.warning("peer %s: JWKS not fetched: %s", peer.name, exc)

    async def close(self) -> None:
        await self._client.aclose()


async def _deltas(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """ChatDelta dicts from a peer's SSE chunks. The finish arrives before the usage chunk,
    and our deltas carry the usage on the finishing one, so that one waits for the usage."""
    finish: dict[str, Any] | None = None
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = _json(data)
        if "error" in chunk:
            raise _PeerFailure(_error_message(json.dumps(chunk)), down=False)
        usage = chunk.get("usage")
        if isinstance(usage, dict) and finish is not None:
            finish["prompt_tokens"] = int(usage.get("prompt_tokens") or 0)
            finish["completion_tokens"] = int(usage.get("completion_tokens") or 0)
        for choice in chunk.get("choices") or []:
            text = str((choice.get("delta") or {}).get("content") or "")
            reason = choice.get("finish_reason")
            if reason:
                finish = {"text": text, "finish_reason": str(reason)}
            elif text:
                yield {"text": text, "finish_reason": None}
    if finish is None:
        raise _PeerFailure("the stream ended without a finish", down=True)
    yield finish


def _json(data: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        raise _PeerFailure("malformed SSE chunk", down=True) from None
    if not isinstance(value, dict):
        raise _PeerFailure("malformed SSE chunk", down=True)
    return value


def _error_message(body: str) -> str:
    """The `error.message` of a CAVE error body, else the body's start."""
    try:
        error = json.loads(body).get("error") or {}
        return f"{error.get('code', 'error')}: {error.get('message', '')}"[:300]
    except (ValueError, AttributeError):
        return body[:300]


def names_unknown_key(error: AuthError) -> bool:
    """Whether the verifier refused a token for its kid (TokenVerifier's unknown-key error
    carries the `kid`): perhaps a peer's key we have not fetched yet."""
    return isinstance(getattr(error, "kid", None), str)
