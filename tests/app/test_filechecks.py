"""Upload checks: what a hostile or broken file meets before anything loads it."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from app import filechecks
from app.filechecks import Rejected
from tests.helpers import _Touch, export_tiny, hostile_pickle, pt2_with_pickled_weights, rewrite_zip

LIMIT = 64 * 2**20


def test_real_export_passes(tmp_path: Path) -> None:
    info = filechecks.check_pt2(export_tiny(tmp_path / "m.pt2"), LIMIT)
    assert info == {"weights": 4, "constants": 0}
    assert filechecks.detect_model_format(tmp_path / "m.pt2") == "pt2"


def test_raw_pickle_is_rejected_without_loading(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    p = tmp_path / "model.pt2"
    p.write_bytes(hostile_pickle(marker))
    with pytest.raises(Rejected, match="pickle"):
        filechecks.check_pt2(p, LIMIT)
    with pytest.raises(Rejected, match="pickles are never accepted"):
        filechecks.detect_model_format(p)
    assert not marker.exists()


def test_torch_save_checkpoint_is_rejected(tmp_path: Path) -> None:
    p = tmp_path / "ckpt.pt2"
    torch.save({"w": torch.zeros(2)}, p)  # a zip of pickles, not an exported program
    with pytest.raises(Rejected, match=r"torch\.save checkpoint .* torch\.export\.save"):
        filechecks.check_pt2(p, LIMIT)
    with pytest.raises(Rejected, match=r"torch\.save checkpoint .* torch\.export\.save"):
        filechecks.detect_model_format(p)


def test_pickled_weight_inside_pt2_is_rejected(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = pt2_with_pickled_weights(tmp_path / "bad.pt2", marker, export_tiny(tmp_path / "m.pt2"))
    with pytest.raises(Rejected, match="pickled"):
        filechecks.check_pt2(bad, LIMIT)
    assert not marker.exists()


def test_hostile_sample_inputs_are_rejected(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    tiny = export_tiny(tmp_path / "m.pt2")
    buf = io.BytesIO()
    torch.save({"inputs": _Touch(marker)}, buf)  # torch's format, hostile payload
    bad = rewrite_zip(tiny, tmp_path / "bad.pt2",
                      lambda name, data: buf.getvalue() if "sample_inputs" in name else data)
    with pytest.raises(Rejected, match="weights_only"):
        filechecks.check_pt2(bad, LIMIT)
    assert not marker.exists()


def _with_weight_0(src_path: Path, dst_path: Path, data: bytes | None) -> Path:
    """A copy of a .pt2 whose first weight's data file is ``data`` (dropped when None)."""
    return rewrite_zip(src_path, dst_path,
                       lambda name, old: data if name.endswith("/data/weights/weight_0") else old)


def test_truncated_or_missing_weight_data_is_rejected(tmp_path: Path) -> None:
    tiny = export_tiny(tmp_path / "m.pt2")
    with zipfile.ZipFile(tiny) as zf:
        [w0] = [n for n in zf.namelist() if n.endswith("/data/weights/weight_0")]
        data = zf.read(w0)
    short = _with_weight_0(tiny, tmp_path / "short.pt2", data[:-4])
    with pytest.raises(Rejected, match=rf"read {len(data)} bytes but the archive holds {len(data) - 4}"):
        filechecks.check_pt2(short, LIMIT)
    gone = _with_weight_0(tiny, tmp_path / "gone.pt2", None)
    with pytest.raises(Rejected, match="'data/weights/weight_0' is missing"):
        filechecks.check_pt2(gone, LIMIT)
    # Longer storage than the view reads is legal (views of a shared storage).
    longer = _with_weight_0(tiny, tmp_path / "long.pt2", data + bytes(8))
    assert filechecks.check_pt2(longer, LIMIT)["weights"] == 4


def test_path_traversal_and_zip_bomb(tmp_path: Path) -> None:
    trav = tmp_path / "t.zip"
    with zipfile.ZipFile(trav, "w") as zf:
        zf.writestr("../../etc/evil", b"x")
        zf.writestr("config.json", b"{}")
    with pytest.raises(Rejected):
        filechecks.check_hf_zip(trav, LIMIT)
    bomb = tmp_path / "b.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", b"{}")
        zf.writestr("model.safetensors", b"\0" * (8 * 2**20))
    with pytest.raises(Rejected):
        filechecks.check_hf_zip(bomb, 2**20)


def test_hf_folder_rules(tmp_path: Path) -> None:
    def make(files: dict[str, bytes]) -> Path:
        p = tmp_path / f"hf{len(list(tmp_path.iterdir()))}.zip"
        with zipfile.ZipFile(p, "w") as zf:
            for n, d in files.items():
                zf.writestr(f"mymodel/{n}", d)
        return p

    from safetensors.torch import save

    st = save({"w": torch.zeros(3, 2)})
    ok = make({"config.json": b'{"model_type": "bert"}', "model.safetensors": st,
               "vocab.txt": b"[PAD]\n"})
    assert filechecks.check_hf_zip(ok, LIMIT)
    with pytest.raises(Rejected, match="no tokenizer"):  # the job could not feed it text
        filechecks.check_hf_zip(make({"config.json": b'{"model_type": "bert"}',
                                      "model.safetensors": st}), LIMIT)
    with pytest.raises(Rejected, match="safetensors"):
        filechecks.check_hf_zip(make({"config.json": b"{}", "pytorch_model.bin": b"x"}), LIMIT)
    with pytest.raises(Rejected, match="own code"):
        filechecks.check_hf_zip(make({"config.json": b"{}", "modeling.py": b"x",
                                      "model.safetensors": st}), LIMIT)


def test_npz_object_arrays_are_rejected(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((4, 3), np.float32), y=np.arange(4))
    assert set(filechecks.check_npz(good, LIMIT)) == {"x", "y"}
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(Rejected, match="object"):
        filechecks.check_npz(bad, LIMIT)


def test_safetensors_sent_as_npz_says_which_format_to_give(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    data = tmp_path / "rows.safetensors"
    save_file({"x": np.zeros((4, 3), np.float32)}, str(data))
    with pytest.raises(Rejected, match="format=safetensors"):
        filechecks.check_npz(data, LIMIT)
    assert set(filechecks.check_safetensors(data)) == {"x"}
