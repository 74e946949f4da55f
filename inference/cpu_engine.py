"""A chat engine on CPU torch with Hugging Face transformers, for laptops and tests.

Concurrency: one generation at a time per engine. Requests queue on an asyncio lock; the token
loop runs in a worker thread so the event loop (and the Serve replica) keeps answering. A
replica that must serve several users at once is scaled with Serve replicas, not threads: CPU
torch already uses every core for one sequence.

The token loop is written here rather than calling `model.generate`: it samples with a private
`torch.Generator` (so a seeded request is reproducible whatever else runs in the process, where
`generate` draws from torch's global generator), and it stops at once when the caller goes away.

Despite the name, a model given GPUs (`num_gpus` in its spec, so `use_gpu=True`) runs on CUDA
when torch sees a GPU there; without one (a CPU wheel of torch, or a logical GPU in a test) it
runs on the CPU as before.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import secrets
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from cave.errors import ConfigError, InvalidArgumentError
from inference.engine import ChatDelta, ChatMessage, ChatRequest, validate_request

_DONE = object()
# Chat templates written before OpenAI's "developer" role know it by its older name.
_TEMPLATE_ROLES = {"developer": "system"}


class CpuEngine:
    """Serve one model directory (the real `from_pretrained` layout) on CPU."""

    kind = "cpu"

    def __init__(self, model_dir: Path, model_id: str, use_gpu: bool = False) -> None:
        """`use_gpu`: the replica was given GPUs; CUDA is used if torch sees one."""
        self.model_id = model_id
        self.device = pick_device(use_gpu)
        self._tokenizer, self._model = _load(Path(model_dir), model_id)
        self._model.to(self.device)
        self._max_positions: int | None = getattr(
            self._model.config, "max_position_embeddings", None
        )
        self._eos_ids = _eos_ids(self._tokenizer, self._model)
        # transformers 5 renamed the key-value cache (argument and output) from past_key_values.
        forward = inspect.signature(self._model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        self._lock = asyncio.Lock()

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ChatDelta, None]:
        validate_request(request)
        if request.model != self.model_id:
            raise InvalidArgumentError(f"model: this engine serves {self.model_id!r}")
        prompt_ids = self._prompt_ids(request.messages)
        async with self._lock:
            async for delta in _in_thread(
                lambda cancel: self._generate(prompt_ids, request, cancel)
            ):
                yield delta

    def _prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        from jinja2 import TemplateError

        try:
            encoded = self._tokenizer.apply_chat_template(
                [
                    {"role": _TEMPLATE_ROLES.get(m.role, m.role), "content": m.content}
                    for m in messages
                ],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )
        except TemplateError as exc:  # templates refuse e.g. roles that do not alternate
            raise InvalidArgumentError(
                f"messages: the model's chat template refuses them: {exc}"
            ) from None
        ids = list(encoded["input_ids"])
        if self._max_positions is not None and len(ids) >= self._max_positions:
            raise InvalidArgumentError(
                f"messages: {len(ids)} prompt tokens fill the context of {self._max_positions}"
            )
        return ids

    def _generate(
        self, prompt_ids: list[int], request: ChatRequest, cancel: threading.Event
    ) -> Iterator[ChatDelta]:
        """The token loop (runs in a worker thread): sample, detokenize, watch for stops."""
        import torch

        budget = request.max_tokens
        if self._max_positions is not None:
            budget = min(budget, self._max_positions - len(prompt_ids))
        generator = torch.Generator(device=self.device).manual_seed(
            request.seed if request.seed is not None else secrets.randbits(63)
        )
        text = _Detokenizer(self._tokenizer)
        stops = _StopScanner(request.stop)
        finish_reason, count = "length", 0
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids], device=self.device)
            out = self._model(input_ids=ids, use_cache=True)
            while count < budget and not cancel.is_set():
                token = _sample(out.logits[0, -1], request.temperature, request.top_p, generator)
                count += 1
                if token in self._eos_ids:
                    finish_reason = "stop"
                    break
                piece, stopped = stops.push(text.add(token))
                if piece:
                    yield ChatDelta(text=piece)
                if stopped:
                    finish_reason = "stop"
                    break
                if count < budget:
                    cache = {self._cache_arg: getattr(out, self._cache_arg)}
                    ids = torch.tensor([[token]], device=self.device)
                    out = self._model(input_ids=ids, use_cache=True, **cache)
        tail = "" if stops.stopped else stops.flush()
        yield ChatDelta(tail, finish_reason, prompt_tokens=len(prompt_ids), completion_tokens=count)


def pick_device(use_gpu: bool) -> str:
    """ "cuda" when the replica was given GPUs and torch can use one, else "cpu". A model given
    none stays on the CPU even where torch sees a GPU: that GPU is reserved for someone else."""
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def _load(model_dir: Path, model_id: str) -> tuple[Any, Any]:
    # Nothing is ever fetched at run time: a model is a directory on this node.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not model_dir.is_dir():
        raise ConfigError(f"model {model_id!r}: {model_dir} is not a directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, or worse on a bad directory
        raise ConfigError(f"model {model_id!r}: cannot load {model_dir}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"model {model_id!r}: the tokenizer in {model_dir} has no chat template")
    model.eval()
    return tokenizer, model


def _eos_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return frozenset(i for i in [*ids, tokenizer.eos_token_id] if i is not None)


def _sample(logits: Any, temperature: float, top_p: float, generator: Any) -> int:
    import torch

    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        # Keep the smallest head whose mass reaches top_p; the first token always stays.
        ordered[torch.cumsum(ordered, dim=0) - ordered >= top_p] = 0.0
        return int(order[torch.multinomial(ordered, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


class _Detokenizer:
    """Incremental decoding: text appears only once a token sequence decodes to whole characters.

    Decoding a window that starts a few tokens back (rather than each token alone) keeps the
    spaces and merges that depend on the neighbouring tokens, as Hugging Face's streamers do.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # end of the tokens already turned into text

    def add(self, token: int) -> str:
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # a partial UTF-8 character or a special token: wait for more
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))


class _StopScanner:
    """Hold back text that may be the start of a stop string; cut the answer before a stop."""

    def __init__(self, stop: list[str]) -> None:
        self._stop = stop
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """Return the text that is safe to send, and whether a stop string was reached."""
        pending = self._pending + text
        hits = [index for s in self._stop if (index := pending.find(s)) >= 0]
        if hits:
            self._pending, self.stopped = "", True
            return pending[: min(hits)], True
        keep = self._held_back(pending)
        self._pending = pending[len(pending) - keep :]
        return pending[: len(pending) - keep], False

    def flush(self) -> str:
        pending, self._pending = self._pending, ""
        return pending

    def _held_back(self, text: str) -> int:
        longest = max((len(s) for s in self._stop), default=1)
        for size in range(min(len(text), longest - 1), 0, -1):
            if any(s.startswith(text[-size:]) for s in self._stop):
                return size
        return 0


async def _in_thread(
    produce: Callable[[threading.Event], Iterator[ChatDelta]],
) -> AsyncIterator[ChatDelta]:
    """Run the blocking iterator `produce(cancel)` in a thread, yielding its items as they come."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancel = threading.Event()

    def work() -> None:
        try:
            for item in produce(cancel):
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except Exception as exc:  # handed to the consumer, raised there
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    worker = loop.run_in_executor(None, work)
    try:
        while (item := await queue.get()) is not _DONE:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        cancel.set()  # the caller went away or the answer is complete: stop the token loop
        await worker
