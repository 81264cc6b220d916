"""Inputs from an uploaded Hugging Face folder fit the model's position table, including the
RoBERTa family's, whose positions start after the padding index."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from modelpress import _base
from tests.helpers import tiny_hf_folder
from workers.engine import models
from workers.engine.context import UserError


@pytest.mark.parametrize(("family", "positions", "expected"), [
    ("bert", 40, 40),      # positions 0..39
    ("roberta", 40, 38),   # pad_token_id 1: positions 2..39
    ("bert", 512, 64),     # the default length where the table is long enough
])
def test_inputs_fit_the_position_table(tmp_path: Path, family: str, positions: int,
                                       expected: int) -> None:
    # zipped as the SDK uploads a folder
    path = _base.zip_folder(tiny_hf_folder(tmp_path / family, family, positions), tmp_path)
    loaded = models._load_hf_zip("m", path, tmp_path / "unpacked")
    assert loaded.info["max_length"] == expected
    inputs = loaded.default_data.inputs
    assert inputs["input_ids"].shape[1] == expected  # the sentences are longer: all padded to it
    with torch.no_grad():
        out = loaded.module(inputs["input_ids"][:4], inputs["attention_mask"][:4])
    assert torch.isfinite(out).all()


def _with_positions(table: nn.Embedding) -> nn.Module:
    embeddings = nn.Module()
    embeddings.position_embeddings = table
    model = nn.Module()
    model.embeddings = embeddings
    return model


def test_max_tokens_from_the_config_and_the_position_table() -> None:
    assert models.max_tokens({}, nn.Linear(2, 2)) == 64  # no table, no limit: the default
    assert models.max_tokens({"max_position_embeddings": 32}, nn.Linear(2, 2)) == 32
    xlmr = _with_positions(nn.Embedding(514, 4, padding_idx=1))
    assert models.max_tokens({"max_position_embeddings": 514}, xlmr) == 64
    assert models.max_tokens({"max_position_embeddings": 40}, _with_positions(
        nn.Embedding(40, 4, padding_idx=1))) == 38
    with pytest.raises(UserError, match="no room"):
        models.max_tokens({"max_position_embeddings": 2}, _with_positions(
            nn.Embedding(2, 4, padding_idx=1)))


def test_a_tokenizer_that_cannot_run_is_the_users_error(tmp_path: Path) -> None:
    folder = tiny_hf_folder(tmp_path / "bert", "bert", 40)
    (folder / "tokenizer.json").unlink()  # the tokenizer is built from vocab.txt, which lacks [UNK]
    # too few words for the sentences, and no [UNK] to stand for the rest
    (folder / "vocab.txt").write_text("[PAD]\n[CLS]\n[SEP]\n[MASK]\nthe\n")
    path = _base.zip_folder(folder, tmp_path)
    with pytest.raises(UserError, match=r"tokenizer does not run \(.*UNK"):
        models._load_hf_zip("m", path, tmp_path / "unpacked")


def test_a_pt2_torch_cannot_load_is_the_users_error(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "fake.pt2"  # the layout of an archive, but no program in it
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a/archive_format", "pt2")
        zf.writestr("a/models/model.json", "{}")
    with pytest.raises(UserError, match=r"not a program torch\.export can load"):
        models._load_pt2("m", path)


def test_uploaded_token_ids_must_fit_the_model(tmp_path: Path) -> None:
    from workers.engine.datasets import TensorData

    path = _base.zip_folder(tiny_hf_folder(tmp_path / "bert", "bert", 40), tmp_path)
    info = models._load_hf_zip("m", path, tmp_path / "unpacked").info
    assert info["max_tokens"] == 40 and info["vocab_size"] == 30522

    def ids(t: torch.Tensor) -> TensorData:
        return TensorData({"input_ids": t, "attention_mask": torch.ones_like(t)})

    models._fits_the_text_model(ids(torch.full((2, 40), 30521)), info)  # the last that fits
    with pytest.raises(UserError, match="sequences are 41 tokens; this model takes at most 40"):
        models._fits_the_text_model(ids(torch.zeros(2, 41, dtype=torch.long)), info)
    with pytest.raises(UserError, match=r"input_ids run from 0 to 30522; .* has 30522 ids"):
        models._fits_the_text_model(ids(torch.tensor([[0, 30522]])), info)
    masked = TensorData({"input_ids": torch.ones(3, 4, dtype=torch.long),
                         "attention_mask": torch.tensor([[1, 1, 0, 0], [0] * 4, [0] * 4])})
    with pytest.raises(UserError, match=r"2 sample\(s\) have an attention_mask of all zeros .*"
                       r"samples 1, 2\)"):
        models._fits_the_text_model(masked, info)
