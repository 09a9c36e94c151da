"""Async iteration over a blocking generator, run whole in one worker thread.

The local model holds its lock in the thread that generates, so a generator must
not hop between threads (as ``run_in_executor(None, next, it)`` per item would).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


async def iterate_in_thread(make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Yield what ``make()``'s iterator yields, produced in one worker thread; the event loop
    stays free meanwhile. An exception in the worker is raised here; leaving early stops it."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    stop = threading.Event()
    end = object()

    def work() -> None:
        try:
            iterator = make()
            try:
                for value in iterator:
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, (value,))
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the consumer
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, end)

    worker = loop.run_in_executor(None, contextvars.copy_context().run, work)
    try:
        while (item := await queue.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item[0]  # type: ignore[index]
    finally:
        stop.set()
        await worker
