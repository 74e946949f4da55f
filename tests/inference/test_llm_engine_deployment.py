"""The CPU engine as a Serve deployment: streamed through a real DeploymentHandle."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray import serve

from cave.errors import InvalidArgumentError
from deployments.llm.engine import build_engine_app, engine_deployment_name
from inference.cpu_engine import CpuEngine
from inference.engine import request_from_dict
from inference.registry import ModelSpec

APP = "engine-test"
MODEL = "tiny"


@pytest.fixture(scope="module")
def catalog(serve_for_handles: None, tiny_model_dir: Path) -> Iterator[Any]:
    spec = ModelSpec(model_id=MODEL, engine="cpu", source=str(tiny_model_dir))
    handle = serve.run(build_engine_app([spec]), name=APP, route_prefix=None)
    yield handle
    serve.delete(APP)


@pytest.fixture(scope="module")
def engine(catalog: Any) -> Any:
    return serve.get_deployment_handle(engine_deployment_name(MODEL), APP)


def request(**options: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    return {"model": MODEL, "messages": messages, "max_tokens": 10, **options}


def test_the_handle_streams_deltas_and_a_final_one_with_usage(
    engine: Any, tiny_model_dir: Path
) -> None:
    deltas = list(engine.options(stream=True).stream.remote(request(temperature=0.0)))

    *pieces, last = deltas
    assert len(pieces) >= 2 and all(p["text"] and p["finish_reason"] is None for p in pieces)
    assert last["finish_reason"] == "length" and last["completion_tokens"] == 10
    assert last["prompt_tokens"] > 0
    # The same model in this process gives the same greedy answer as the replica.
    local = CpuEngine(tiny_model_dir, MODEL)
    chat = request_from_dict(request(temperature=0.0))
    expected = asyncio.run(_text(local, chat))
    assert "".join(d["text"] for d in deltas) == expected


async def _text(engine: CpuEngine, chat: Any) -> str:
    return "".join([delta.text async for delta in engine.stream(chat)])


def test_seeded_sampling_is_reproducible_across_calls(engine: Any) -> None:
    def answer(seed: int) -> str:
        stream = engine.options(stream=True).stream.remote(request(seed=seed, max_tokens=16))
        return "".join(delta["text"] for delta in stream)

    assert answer(21) == answer(21)


def test_the_catalog_and_the_engine_say_what_they_serve(catalog: Any, engine: Any) -> None:
    assert catalog.info.remote().result() == [{"model_id": MODEL, "engine": "cpu"}]
    assert engine.info.remote().result() == {"model_id": MODEL, "engine": "cpu"}


def test_a_bad_request_reaches_the_caller_as_invalid_argument(engine: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="max_tokens"):
        list(engine.options(stream=True).stream.remote(request(max_tokens=0)))
    with pytest.raises(InvalidArgumentError, match="model"):
        list(engine.options(stream=True).stream.remote(request(model="other")))
