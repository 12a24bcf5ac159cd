"""The offline Engine: srt's runtime as a Python object, no HTTP (lives in the caller's process).

`Engine(model_path=..., **server_args_fields)` starts the same scheduler and detokenizer
processes as the server, and runs a TokenizerManager on a private event loop in a background
thread. `generate` (blocking) and `async_generate` (from any event loop) return the same dicts as
POST /generate. `shutdown()` stops everything; it also runs at interpreter exit and at the end of
`with Engine(...) as engine:`.

If a child process dies, pending and later requests raise `RuntimeDeadError` instead of the
whole Python process exiting (the server, by contrast, exits).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from srt.entrypoints.launch import configure_logging, launch_subprocesses, prepare_server_args
from srt.managers.tokenizer_manager import (
    GenerateReqInput,
    RuntimeDeadError,
    TokenizerManager,
    final_output,
    merge_streams,
    public_output,
    requested_n,
    run_all,
)
from srt.server_args import PortArgs, ServerArgs

logger = logging.getLogger(__name__)

T = TypeVar("T")

Prompt = str | list[str] | None
Params = dict[str, Any] | list[dict[str, Any]] | None
Ids = list[int] | list[list[int]] | None


class Engine:
    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        self._closed = True  # until fully started, so a failed __init__ leaves nothing behind
        self._procs = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.tokenizer_manager: TokenizerManager | None = None
        server_args = ServerArgs(model_path=model_path, **kwargs)
        configure_logging(server_args, "engine", force=False)  # the host may own logging
        self.server_args = prepare_server_args(server_args)
        self._port_args = PortArgs.new(server_args)
        try:
            self._procs = launch_subprocesses(self.server_args, self._port_args)
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._loop.run_forever, name="srt-engine-loop", daemon=True
            )
            self._thread.start()
            self.tokenizer_manager = self._call(self._make_tokenizer_manager())
        except BaseException:
            self._teardown()
            raise
        self._closed = False
        self._procs.start_watchdog(self._on_child_death)
        atexit.register(self.shutdown)

    async def _make_tokenizer_manager(self) -> TokenizerManager:
        # Built on the engine loop, so its asyncio sockets belong to that loop.
        assert self._procs is not None
        tm = TokenizerManager(self.server_args, self._port_args, self._procs.scheduler_info)
        tm.start()
        return tm

    @property
    def scheduler_info(self) -> dict[str, Any]:
        return self._procs.scheduler_info if self._procs is not None else {}

    # ---- generation ------------------------------------------------------------------------

    def generate(
        self,
        prompt: Prompt = None,
        sampling_params: Params = None,
        input_ids: Ids = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Blocking generation: a dict for one prompt, a list of dicts for a batch.

        Raises ValueError for an invalid request; Ctrl-C aborts the requests."""
        objs, batch = self._inputs(prompt, sampling_params, input_ids, stream=False)
        future = self._submit(self._generate_all(objs))
        try:
            outs = future.result()
        except BaseException:
            future.cancel()  # aborts the requests still running
            raise
        return outs if batch else outs[0]

    async def async_generate(
        self,
        prompt: Prompt = None,
        sampling_params: Params = None,
        stream: bool = False,
        input_ids: Ids = None,
    ) -> dict[str, Any] | list[dict[str, Any]] | AsyncIterator[dict[str, Any]]:
        """Like `generate`, from any event loop. With stream=True, returns an async iterator of
        output dicts (cumulative text; a batch adds "index" to each)."""
        objs, batch = self._inputs(prompt, sampling_params, input_ids, stream=stream)
        if stream:
            return self._bridge_stream(objs, batch)
        outs = await asyncio.wrap_future(self._submit(self._generate_all(objs)))
        return outs if batch else outs[0]

    def _inputs(
        self, prompt: Prompt, sampling_params: Params, input_ids: Ids, stream: bool
    ) -> tuple[list[GenerateReqInput], bool]:
        if self._closed:
            raise RuntimeError("the Engine has been shut down")
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of `prompt` and `input_ids`")
        if prompt is not None:
            batch = isinstance(prompt, list)
            items: list[Any] = list(prompt) if batch else [prompt]
            key = "text"
        else:
            ids = input_ids or []
            batch = bool(ids) and isinstance(ids[0], list)
            items = list(ids) if batch else [ids]
            key = "input_ids"
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(items):
                raise ValueError(f"{len(sampling_params)} sampling_params for {len(items)} prompts")
            sps = sampling_params
        else:
            sps = [sampling_params] * len(items)
        objs = []
        for item, sp in zip(items, sps, strict=True):
            obj = GenerateReqInput(sampling_params=dict(sp or {}), stream=stream)
            setattr(obj, key, item)
            objs.append(obj)
        # n > 1: n choices per prompt, returned as a list (index = prompt * n + j).
        batch = batch or any(requested_n(o.sampling_params) > 1 for o in objs)
        return objs, batch

    async def _generate_all(self, objs: list[GenerateReqInput]) -> list[dict[str, Any]]:
        tm = self._tm()
        # Validate everything first, so a bad prompt in a batch sends nothing.
        reqs = [
            r
            for o in objs
            for r in tm.fan_out(await tm.tokenize_request(o), requested_n(o.sampling_params))
        ]
        outs = await run_all([final_output(tm.generate_tokenized(r)) for r in reqs])
        return [public_output(o) for o in outs]

    async def _bridge_stream(
        self, objs: list[GenerateReqInput], batch: bool
    ) -> AsyncIterator[dict[str, Any]]:
        """Carries a stream from the engine loop to the caller's loop, one chunk per hop."""
        inner = self._stream_on_engine_loop(objs, batch)
        try:
            while True:
                fut = self._submit(_anext_or_none(inner))
                item = await asyncio.wrap_future(fut)
                if item is None:
                    return
                yield item
        finally:
            # Closing `inner` on its own loop cancels and aborts whatever is still running.
            if self._loop is not None and not self._loop.is_closed():
                asyncio.run_coroutine_threadsafe(_aclose_quietly(inner), self._loop)

    async def _stream_on_engine_loop(
        self, objs: list[GenerateReqInput], batch: bool
    ) -> AsyncIterator[dict[str, Any]]:
        tm = self._tm()
        reqs = [
            r
            for o in objs
            for r in tm.fan_out(await tm.tokenize_request(o), requested_n(o.sampling_params))
        ]
        async for i, out in merge_streams([tm.generate_tokenized(r) for r in reqs]):
            d = public_output(out)
            if batch:
                d["index"] = i
            yield d

    def _tm(self) -> TokenizerManager:
        if self.tokenizer_manager is None:
            raise RuntimeError("the Engine has been shut down")
        return self.tokenizer_manager

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._closed or self._loop is None:
            coro.close()
            raise RuntimeError("the Engine has been shut down")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # ---- lifecycle -------------------------------------------------------------------------

    def _on_child_death(self, name: str, code: int | None) -> None:
        reason = f"the {name} process died (exit code {code})"
        tm, loop = self.tokenizer_manager, self._loop
        if tm is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(tm.fail_all, reason)

    def shutdown(self) -> None:
        """Stops the children and the engine loop; idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        self._teardown()

    def _teardown(self) -> None:
        loop, tm = self._loop, self.tokenizer_manager
        if loop is not None and not loop.is_closed():
            if tm is not None:
                try:
                    fut = asyncio.run_coroutine_threadsafe(_close_tm(tm), loop)
                    fut.result(timeout=5)
                except (concurrent.futures.TimeoutError, RuntimeError) as e:
                    logger.warning("closing the tokenizer manager: %s", e)
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=5)
            if not loop.is_running():
                loop.close()
        self.tokenizer_manager = None
        if self._procs is not None:
            self._procs.shutdown()
        self._port_args.cleanup()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


async def _close_tm(tm: TokenizerManager) -> None:
    tm.fail_all("the Engine was shut down")
    tm.close()
    # Let cancelled tasks (the receive loop, pending requests) finish unwinding.
    await asyncio.sleep(0)


async def _anext_or_none(it: AsyncIterator[T]) -> T | None:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


async def _aclose_quietly(it: AsyncIterator[Any]) -> None:
    try:
        await it.aclose()  # type: ignore[attr-defined]
    except (RuntimeError, RuntimeDeadError):
        pass  # already closing from a cancelled __anext__
