"""The API's background loops (pending deletes, unsent jobs, retention) share one shape."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable


async def repeat(step: Callable[[], Awaitable[object]], every_s: float, what: str,
                 log: logging.Logger) -> None:
    """Run ``step`` every ``every_s`` seconds until cancelled. A round that fails (Redis
    restarting, say) is logged as "<what> failed"; the next round tries again."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("%s failed", what, exc_info=True)
        # A cancel can be swallowed inside a step (seen when it lands in a redis-py command at
        # startup): the step returns, and the loop slept on while the app's shutdown waited
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
        await asyncio.sleep(every_s)
