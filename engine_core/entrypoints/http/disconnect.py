"""Noticing that an HTTP client went away while its request is being served, so the work done
for it (engine requests, a proxied request on an instance) can be aborted at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

__all__ = ["ClientDisconnected", "unless_disconnected", "wait_for_disconnect"]

_T = TypeVar("_T")


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has disconnected (or the response is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, _T],
                              discard: Callable[[_T], object] | None = None) -> _T:
    """Run `work`; cancel it (so it aborts what it started) if the client disconnects first,
    and raise ClientDisconnected. The request body must have been read already.

    A cancelled `work` may still end with a result: on Python 3.11 `asyncio.wait_for` swallows
    a cancellation that arrives as its inner wait completes. `discard(result)` is then called
    with it, so whatever the result holds open (a proxied stream, say) is let go."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            if discard is not None:
                task.add_done_callback(lambda t: _discard_late(t, discard))
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientDisconnected


def _discard_late(task: asyncio.Future, discard: Callable[[Any], object]) -> None:
    if not task.cancelled() and task.exception() is None:
        discard(task.result())
