"""The zoo's training cache: one stored object per model (weights with the meta in the
safetensors header), read back by a process that did not train it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as save_st_bytes

from app.config import Settings
from app.storage import Store, open_store
from workers.engine import zoo


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    saved = dict(zoo._memory_cache), set(zoo._in_store)
    yield open_store(Settings(store_url=(tmp_path / "store").as_uri()))
    zoo._memory_cache.clear()
    zoo._memory_cache.update(saved[0])
    zoo._in_store.clear()
    zoo._in_store.update(saved[1])


def forget() -> None:
    """As a fresh worker process: nothing in memory."""
    zoo._memory_cache.pop("zoo/test/v1", None)
    zoo._in_store.clear()


def test_one_object_holds_weights_and_meta(store: Store, tmp_path: Path) -> None:
    trained: list[int] = []

    def train() -> tuple[torch.nn.Module, dict[str, Any]]:
        trained.append(1)
        torch.manual_seed(len(trained))
        return torch.nn.Linear(4, 3), {"test_accuracy": 0.5, "train_seconds": 1.25}

    forget()
    state, meta = zoo.cached_training("zoo/test/v1", train, store)
    files = [p.relative_to(tmp_path / "store").as_posix()
             for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert files == ["zoo/test/v1/trained.safetensors"]
    assert meta == {"test_accuracy": 0.5, "train_seconds": 1.25}

    forget()
    again, meta_again = zoo.cached_training("zoo/test/v1", train, store)
    assert trained == [1] and meta_again == meta  # read from the store, not trained again
    assert all(torch.equal(state[k], again[k]) for k in state)

    # Another worker's training lands over it: its weights come with its own meta, never mixed.
    other = torch.nn.Linear(4, 3)
    store.put_bytes("zoo/test/v1/trained.safetensors", save_st_bytes(
        {k: v.contiguous() for k, v in other.state_dict().items()},
        metadata={"modelpress_meta": '{"train_seconds": 9.0}'}))
    forget()
    theirs, their_meta = zoo.cached_training("zoo/test/v1", train, store)
    assert their_meta == {"train_seconds": 9.0}
    assert torch.equal(theirs["weight"], other.weight.detach())


def test_weights_trained_on_a_gpu_are_cached_apart(store: Store, tmp_path: Path) -> None:
    """Only the device's type names the key: ``train`` itself runs wherever it runs (here the
    CPU), so this needs no GPU."""
    trained: list[str] = []

    def train(where: str) -> tuple[torch.nn.Module, dict[str, Any]]:
        trained.append(where)
        return torch.nn.Linear(2, 2), {"where": where}

    forget()
    zoo._memory_cache.pop("zoo/test/v1-cuda", None)
    _, cpu_meta = zoo.cached_training("zoo/test/v1", lambda: train("cpu"), store,
                                      torch.device("cpu"))
    _, gpu_meta = zoo.cached_training("zoo/test/v1", lambda: train("cuda"), store,
                                      torch.device("cuda"))
    assert trained == ["cpu", "cuda"] and (cpu_meta, gpu_meta) == ({"where": "cpu"},
                                                                  {"where": "cuda"})
    files = sorted(p.relative_to(tmp_path / "store").as_posix()
                   for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert files == ["zoo/test/v1-cuda/trained.safetensors", "zoo/test/v1/trained.safetensors"]
