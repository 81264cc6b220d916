"""The API's background loops end when cancelled, even when a round swallowed the cancel: the
app's shutdown waits for them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from fastapi.testclient import TestClient

from app import loops
from app.config import Settings
from app.main import create_app


def test_a_loop_whose_round_swallowed_the_cancel_ends() -> None:
    async def main() -> None:
        started = asyncio.Event()

        async def step() -> None:  # as a Redis command that ends normally although cancelled
            started.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)

        task = asyncio.create_task(loops.repeat(step, 60, "test", logging.getLogger("test")))
        await started.wait()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=5)
        assert done and task.cancelled()

    asyncio.run(main())


def test_the_app_stops_when_stopped_as_it_starts(settings: Settings) -> None:
    """Its loops' first rounds are still reading Redis when the shutdown cancels them."""
    stopped = threading.Event()

    def start_and_stop() -> None:
        with TestClient(create_app(settings)):
            pass
        stopped.set()

    threading.Thread(target=start_and_stop, daemon=True).start()
    assert stopped.wait(20), "the app's shutdown hung"
