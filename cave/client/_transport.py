"""Sending a `Call` over httpx: auth, pooling, retries of reads, errors translated at the edge.

Every httpx exception is caught here and raised again as a `CaveAPIError` (the httpx habit of
translating the library underneath where it is called), so callers never see an httpx type.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import httpx

from cave import __version__
from cave.client._errors import (
    APIResponseError,
    ClientConfigError,
    error_from_body,
    error_from_response,
    transport_error,
)
from cave.client._models import ExecEvent, ExecResult, OutputChunk
from cave.client._routes import CLIENT_TIMEOUT, Call

T = TypeVar("T")
URL_ENV = "CAVE_API_URL"
KEY_ENV = "CAVE_API_KEY"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_RETRIES = 2
MAX_BACKOFF_S = 8.0
USER_AGENT = f"cave-sandbox-client/{__version__}"


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    api_key: str
    timeout: httpx.Timeout
    max_retries: int

    @classmethod
    def resolve(
        cls,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout,
        max_retries: int,
    ) -> ClientConfig:
        """Arguments first, then $CAVE_API_URL and $CAVE_API_KEY."""
        url = base_url or os.environ.get(URL_ENV)
        key = api_key or os.environ.get(KEY_ENV)
        if not url:
            raise ClientConfigError("no_base_url", f"no API URL: pass base_url or set ${URL_ENV}")
        if not key:
            raise ClientConfigError("no_api_key", f"no API key: pass api_key or set ${KEY_ENV}")
        limit = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        return cls(url.rstrip("/"), key, limit, max_retries)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}", "User-Agent": USER_AGENT}


def _request_options(call: Call[Any], config: ClientConfig) -> dict[str, Any]:
    timeout = config.timeout
    if call.read_timeout_s != CLIENT_TIMEOUT:
        read_s = call.read_timeout_s
        timeout = httpx.Timeout(
            connect=timeout.connect, read=read_s, write=timeout.write, pool=timeout.pool
        )
    # URL and auth go on each request, so that a caller's own httpx client works unchanged.
    return {
        "method": call.method,
        "url": config.base_url + call.path,
        "params": call.params,
        "json": call.json,
        "content": call.content,
        "headers": {**config.headers(), **call.headers},
        "timeout": timeout,
    }


def _backoff_s(attempt: int, response: httpx.Response | None) -> float:
    """Retry-After when the server gives seconds, else exponential with jitter."""
    if response is not None:
        try:
            return min(float(response.headers.get("retry-after", "")), MAX_BACKOFF_S)
        except ValueError:
            pass
    return min(0.25 * 2**attempt, MAX_BACKOFF_S) * random.uniform(0.75, 1.25)


def _retries(call: Call[Any], attempt: int, config: ClientConfig) -> bool:
    return call.retryable and attempt < config.max_retries


def _parse(call: Call[T], response: httpx.Response) -> T:
    try:
        return call.parse(response)
    except (ValueError, KeyError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise APIResponseError(
            "invalid_response",
            f"unexpected answer to {call.method} {call.path}: {exc}",
            response.headers.get("x-request-id"),
            response.status_code,
        ) from None


def _cut_short(call: Call[Any]) -> APIResponseError:
    message = f"the stream of {call.method} {call.path} ended without a result"
    return APIResponseError("invalid_response", message)


def event_from_line(line: str) -> ExecEvent | None:
    """One NDJSON line of a streamed exec; an `error` event raises its mapped exception.

    None for an event type this client does not know (a newer server's, e.g. `started`).
    """
    try:
        event = json.loads(line)
        kind = event["type"]
        if kind in ("stdout", "stderr"):
            return OutputChunk(stream=kind, data=event["data"])
        if kind == "result":
            return ExecResult.model_validate(event["result"])
        if kind != "error":
            return None
        error = error_from_body(event["error"])
    except (ValueError, KeyError, TypeError) as exc:
        message = f"bad exec stream line {line!r}: {exc}"
        raise APIResponseError("invalid_response", message) from None
    raise error


class SyncTransport:
    """One pooled httpx.Client: connections are kept alive across calls."""

    def __init__(self, config: ClientConfig, http_client: httpx.Client | None = None) -> None:
        self.config = config
        self._client = http_client or httpx.Client()

    def send(self, call: Call[T]) -> T:
        return _parse(call, self._response(call))

    def _response(self, call: Call[Any]) -> httpx.Response:
        attempt = 0
        while True:
            response: httpx.Response | None = None
            try:
                response = self._client.request(**_request_options(call, self.config))
            except httpx.HTTPError as exc:
                transient = isinstance(exc, httpx.TransportError)
                if not (transient and _retries(call, attempt, self.config)):
                    raise transport_error(exc, self.config.base_url) from exc
            else:
                if response.is_success:
                    return response
                if not (response.status_code == 503 and _retries(call, attempt, self.config)):
                    raise error_from_response(response)
            time.sleep(_backoff_s(attempt, response))
            attempt += 1

    def events(self, call: Call[Any]) -> Iterator[ExecEvent]:
        """The NDJSON events of a streamed call, as they arrive; closes the response when done."""
        options = _request_options(call, self.config)
        try:
            with self._client.stream(**options) as response:
                if not response.is_success:
                    response.read()
                    raise error_from_response(response)
                for line in response.iter_lines():
                    event = event_from_line(line) if line.strip() else None
                    if event is not None:
                        yield event
                    if isinstance(event, ExecResult):
                        return
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.config.base_url) from exc
        raise _cut_short(call)

    def close(self) -> None:
        self._client.close()


class AsyncTransport:
    """One pooled httpx.AsyncClient; the same retry and error rules as SyncTransport."""

    def __init__(self, config: ClientConfig, http_client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self._client = http_client or httpx.AsyncClient()

    async def send(self, call: Call[T]) -> T:
        return _parse(call, await self._response(call))

    async def _response(self, call: Call[Any]) -> httpx.Response:
        attempt = 0
        while True:
            response: httpx.Response | None = None
            try:
                response = await self._client.request(**_request_options(call, self.config))
            except httpx.HTTPError as exc:
                transient = isinstance(exc, httpx.TransportError)
                if not (transient and _retries(call, attempt, self.config)):
                    raise transport_error(exc, self.config.base_url) from exc
            else:
                if response.is_success:
                    return response
                if not (response.status_code == 503 and _retries(call, attempt, self.config)):
                    raise error_from_response(response)
            await anyio.sleep(_backoff_s(attempt, response))
            attempt += 1

    async def events(self, call: Call[Any]) -> AsyncIterator[ExecEvent]:
        options = _request_options(call, self.config)
        try:
            async with self._client.stream(**options) as response:
                if not response.is_success:
                    await response.aread()
                    raise error_from_response(response)
                async for line in response.aiter_lines():
                    event = event_from_line(line) if line.strip() else None
                    if event is not None:
                        yield event
                    if isinstance(event, ExecResult):
                        return
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.config.base_url) from exc
        raise _cut_short(call)

    async def aclose(self) -> None:
        await self._client.aclose()
