"""API-only stacks (a real API process and Redis, no worker: jobs stay queued) for the tests of
the dashboard's answers, which need no job to run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from modelpress import _stack
from tests.conftest import Stack, make_stack

RATE_LIMIT = 5


def _api_only(root: Path, redis_server: _stack.EmbeddedRedis, env: dict[str, str]
              ) -> Iterator[Stack]:
    s = make_stack(root, redis_server, env)
    s.start_api()
    try:
        # /readyz wants a live worker; /healthz is the API process alone
        deadline = time.monotonic() + 90
        while True:
            assert s.api is not None and s.api.poll() is None, s.dump_logs()
            try:
                if httpx.get(f"{s.base_url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, s.dump_logs()
            time.sleep(0.25)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def ui_stack(tmp_path_factory: pytest.TempPathFactory, redis_server: _stack.EmbeddedRedis
             ) -> Iterator[Stack]:
    yield from _api_only(tmp_path_factory.mktemp("ui"), redis_server, {})


@pytest.fixture(scope="module")
def limited_ui_stack(tmp_path_factory: pytest.TempPathFactory,
                     redis_server: _stack.EmbeddedRedis) -> Iterator[Stack]:
    yield from _api_only(tmp_path_factory.mktemp("ui-limited"), redis_server,
                         {"MODELPRESS_RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT)})
