"""Small builders shared by tests: exported models, hostile files, scripted HTTP servers, and the
figures tests report."""

from __future__ import annotations

import contextlib
import json
import pathlib
import pickle
import threading
import zipfile
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from torch import nn


class ScriptedHandler(BaseHTTPRequestHandler):
    """The base of a test's HTTP server: HTTP/1.1, quiet, one call per answer."""

    protocol_version = "HTTP/1.1"

    def answer(self, status: int, body: bytes, ctype: str = "application/json",
               **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # a client that gave up and went away
            super().handle()


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1") -> Iterator[str]:
    """``handler`` served on a free port of ``host`` in a thread; yields its base URL."""
    httpd = ThreadingHTTPServer((host, 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://{host}:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


# Figures a test measured (cases tried, jobs and attempts), printed after the run by the
# terminal-summary hook in conftest.py, so they show in CI's `pytest -q` output too.
measured: list[str] = []


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(x)))
        return out


def export_tiny(path: Path, batch: int = 4) -> Path:
    """A real torch.export archive, saved the way a user would."""
    torch.manual_seed(0)
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(TinyMLP().eval(), (torch.randn(batch, 16),),
                             dynamic_shapes={"x": {0: batch_dim}})
    torch.export.save(ep, str(path))
    return path


class _Touch:
    """Unpickling this creates ``marker``: proof that someone executed the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def hostile_pickle(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": _Touch(marker)})


def rewrite_zip(src_path: Path, dst_path: Path, edit: Callable[[str, bytes], bytes | None]) -> Path:
    """A copy of a zip (a .pt2) with each member's bytes passed through ``edit(name, data)``;
    a member it returns None for is left out."""
    with zipfile.ZipFile(src_path) as src, zipfile.ZipFile(dst_path, "w") as dst:
        for info in src.infolist():
            data = edit(info.filename, src.read(info.filename))
            if data is not None:
                dst.writestr(info.filename, data)
    return dst_path


def pt2_with_pickled_weights(path: Path, marker: Path, tiny: Path) -> Path:
    """A .pt2 whose layout is right but whose first weight is a hostile pickle flagged
    ``use_pickle`` (which torch.export.load would hand to the unpickler)."""

    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("/data/weights/weight_0"):
            return hostile_pickle(marker)
        if name.endswith("model_weights_config.json"):
            cfg = json.loads(data)
            first = next(iter(cfg["config"].values()))
            first["use_pickle"] = True
            return json.dumps(cfg).encode()
        return data

    return rewrite_zip(tiny, path, edit)


def tiny_hf_folder(dest: Path, family: str = "bert", positions: int = 128) -> Path:
    """A small BERT (or RoBERTa) saved the Hugging Face way (safetensors), with MiniLM's
    tokenizer files; ``positions``: its max_position_embeddings."""
    import shutil

    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    from workers.engine import zoo

    torch.manual_seed(0)
    shape = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": positions}
    model = (BertModel(BertConfig(**shape)) if family == "bert"
             else RobertaModel(RobertaConfig(**shape)))
    model.save_pretrained(dest, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(zoo.minilm_dir() / name, dest / name)
    return dest


def digits_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's shared store, or (under ``--noconftest``, as scripts/gpu_check.sh runs on
    a GPU machine without Redis) a store with only digits-cnn trained into it."""
    from app.config import Settings
    from app.storage import open_store
    from workers.engine import zoo

    try:
        return Path(request.getfixturevalue("shared_store"))
    except pytest.FixtureLookupError:
        root = tmp_path_factory.mktemp("store")
        zoo.digits_cnn(open_store(Settings(store_url=root.as_uri())))
        return root
