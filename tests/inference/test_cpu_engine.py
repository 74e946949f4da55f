"""The CPU engine on a tiny random-weight model built on disk: streaming, sampling, limits."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from cave.errors import ConfigError, InvalidArgumentError
from inference.cpu_engine import CpuEngine
from inference.engine import ChatDelta, ChatEngine, ChatMessage, ChatRequest, request_from_dict

MODEL = "tiny"
pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> CpuEngine:
    return CpuEngine(tiny_model_dir, MODEL)


def chat(content: str = "Hello there", **options: Any) -> ChatRequest:
    fields: dict[str, Any] = {"model": MODEL, **options}
    return ChatRequest(messages=[ChatMessage("user", content)], **fields)


async def collect(engine: ChatEngine, request: ChatRequest) -> list[ChatDelta]:
    return [delta async for delta in engine.stream(request)]


def text_of(deltas: list[ChatDelta]) -> str:
    return "".join(delta.text for delta in deltas)


async def test_streams_pieces_then_a_final_delta_with_usage(
    engine: CpuEngine, tiny_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    deltas = await collect(engine, chat(max_tokens=12, temperature=0.0))

    *pieces, last = deltas
    assert len(pieces) >= 3 and all(p.text and p.finish_reason is None for p in pieces)
    assert all(p.prompt_tokens is None and p.completion_tokens is None for p in pieces)
    assert last.finish_reason in {"stop", "length"}
    prompt: Any = AutoTokenizer.from_pretrained(tiny_model_dir).apply_chat_template(
        [{"role": "user", "content": "Hello there"}], add_generation_prompt=True, return_dict=True
    )
    assert last.prompt_tokens == len(prompt["input_ids"])
    assert last.completion_tokens is not None and 1 <= last.completion_tokens <= 12
    assert isinstance(engine, ChatEngine)


async def test_greedy_and_seeded_answers_are_reproducible(engine: CpuEngine) -> None:
    greedy = [text_of(await collect(engine, chat(max_tokens=20, temperature=0.0))) for _ in "ab"]
    seeded = [text_of(await collect(engine, chat(max_tokens=20, seed=7))) for _ in "ab"]
    other_seed = text_of(await collect(engine, chat(max_tokens=20, seed=8)))

    assert greedy[0] == greedy[1] and greedy[0]
    assert seeded[0] == seeded[1] and seeded[0]
    assert other_seed != seeded[0]


async def test_top_p_narrows_sampling_to_the_greedy_choice(engine: CpuEngine) -> None:
    greedy = text_of(await collect(engine, chat(max_tokens=20, temperature=0.0)))
    # With top_p this small only the most likely token remains at every step.
    nucleus = text_of(await collect(engine, chat(max_tokens=20, top_p=1e-6, seed=3)))
    assert nucleus == greedy


async def test_max_tokens_ends_the_answer_with_length(engine: CpuEngine) -> None:
    deltas = await collect(engine, chat(max_tokens=5, temperature=0.0))

    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].completion_tokens == 5


async def test_a_stop_string_cuts_the_answer_before_it(engine: CpuEngine) -> None:
    full = text_of(await collect(engine, chat(max_tokens=40, temperature=0.0)))
    stop = full[12:15]
    cut = full.index(stop)

    deltas = await collect(engine, chat(max_tokens=40, temperature=0.0, stop=["\x00zz", stop]))

    assert text_of(deltas) == full[:cut]
    assert stop not in text_of(deltas)
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].completion_tokens is not None and deltas[-1].completion_tokens < 40


async def test_requests_wait_for_each_other_and_get_the_same_answers(tiny_model_dir: Path) -> None:
    engine = CpuEngine(tiny_model_dir, MODEL)  # its lock belongs to this test's event loop
    alone = text_of(await collect(engine, chat(max_tokens=15, temperature=0.0)))

    together = await asyncio.gather(
        *(collect(engine, chat(max_tokens=15, temperature=0.0)) for _ in range(3))
    )

    assert [text_of(deltas) for deltas in together] == [alone] * 3


async def test_a_caller_that_leaves_frees_the_engine(engine: CpuEngine) -> None:
    stream = engine.stream(chat(max_tokens=200, temperature=0.0))
    first = await anext(stream)
    await stream.aclose()  # as when an HTTP client disconnects mid-answer

    deltas = await collect(engine, chat(max_tokens=3, temperature=0.0))
    assert first.text and deltas[-1].completion_tokens == 3


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 40_000}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"seed": -1}, "seed"),
        ({"model": "other"}, "model"),
    ],
)
async def test_impossible_requests_are_refused(
    engine: CpuEngine, options: dict[str, Any], field: str
) -> None:
    request = chat(**{"max_tokens": 4, **options})
    with pytest.raises(InvalidArgumentError, match=field):
        await collect(engine, request)


async def test_a_prompt_longer_than_the_context_is_refused(engine: CpuEngine) -> None:
    with pytest.raises(InvalidArgumentError, match="context"):
        await collect(engine, chat("x" * 300, max_tokens=4))


async def test_messages_the_chat_template_refuses_are_invalid(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    shutil.copytree(tiny_model_dir, tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    # Like many real templates: the conversation must open with the user.
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with the user') }}"
        "{% endif %}" + tokenizer.chat_template
    )
    tokenizer.save_pretrained(tmp_path / "model")
    strict = CpuEngine(tmp_path / "model", MODEL)

    assert (await collect(strict, chat(max_tokens=2)))[-1].completion_tokens == 2
    opening = ChatRequest(MODEL, [ChatMessage("assistant", "Hi"), ChatMessage("user", "Hi")])
    with pytest.raises(InvalidArgumentError, match="start with the user"):
        await collect(strict, opening)


def test_request_dicts_are_checked() -> None:
    request = request_from_dict(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": None}
    )
    assert request.temperature == 1.0 and request.max_tokens == 256 and request.stop == []
    bad_requests: list[dict[str, Any]] = [
        {"model": MODEL},
        {"model": MODEL, "messages": [{"role": "user"}]},
        {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": True},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": "x"},
    ]
    for bad in bad_requests:
        with pytest.raises(InvalidArgumentError):
            request_from_dict(bad)


def test_a_missing_model_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        CpuEngine(tmp_path / "absent", MODEL)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot load"):
        CpuEngine(tmp_path / "empty", MODEL)
