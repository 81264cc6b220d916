"""Upload checks: what a hostile or broken file meets before anything loads it."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path
from typing import Any

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


def _safetensors_bytes(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("header, message", [
    ([], "not a JSON object"),
    ("abc", "not a JSON object"),
    ({"x": 1}, "has no dtype, shape and data_offsets"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}, "points outside the file"),
    ({"x": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}, "unsupported dtype"),
])
def test_malformed_safetensors_headers_are_rejected(tmp_path: Path, header: object,
                                                    message: str) -> None:
    p = tmp_path / "d.safetensors"
    p.write_bytes(_safetensors_bytes(header, bytes(4)))
    with pytest.raises(Rejected, match=message):
        filechecks.check_dataset(p, "safetensors", LIMIT)
    hf = tmp_path / "hf.zip"
    with zipfile.ZipFile(hf, "w") as zf:
        zf.writestr("config.json", b'{"model_type": "bert"}')
        zf.writestr("vocab.txt", b"[PAD]\n")
        zf.writestr("model.safetensors", p.read_bytes())
    with pytest.raises(Rejected, match=message):
        filechecks.check_model(hf, None, LIMIT)


def _pt2_member(tiny: Path, dst: Path, suffix: str, data: bytes | None) -> Path:
    return rewrite_zip(tiny, dst, lambda name, old: data if name.endswith(suffix) else old)


@pytest.mark.parametrize("suffix, data, message", [
    ("/archive_format", None, "no archive_format"),
    ("/model_weights_config.json", b"{not json", "is not valid JSON"),
    ("/model_weights_config.json", b"{}", "has no 'config' object"),
    ("/model_weights_config.json", b'{"config": {"w": 1}}', "unreadable metadata"),
    ("/model_weights_config.json", b'{"config": {"w": {"path_name": "weight_0", '
                                   b'"tensor_meta": 3}}}', "unreadable tensor metadata"),
])
def test_malformed_pt2_members_are_rejected(tmp_path: Path, suffix: str, data: bytes | None,
                                            message: str) -> None:
    bad = _pt2_member(export_tiny(tmp_path / "m.pt2"), tmp_path / "bad.pt2", suffix, data)
    with pytest.raises(Rejected, match=message):
        filechecks.check_model(bad, None, LIMIT)


def test_hf_config_that_is_not_json_is_rejected(tmp_path: Path) -> None:
    from safetensors.torch import save

    p = tmp_path / "hf.zip"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("m/config.json", b'{"model_type": ')
        zf.writestr("m/vocab.txt", b"[PAD]\n")
        zf.writestr("m/model.safetensors", save({"w": torch.zeros(2)}))
    with pytest.raises(Rejected, match=r"'m/config\.json' is not valid JSON"):
        filechecks.check_model(p, None, LIMIT)


def test_a_parse_error_no_check_anticipated_is_still_a_rejection(tmp_path: Path) -> None:
    # A deflated member whose bytes are garbage: zipfile raises zlib.error on reading it.
    p = export_tiny(tmp_path / "m.pt2")
    broken = tmp_path / "broken.pt2"
    with zipfile.ZipFile(p) as src, zipfile.ZipFile(broken, "w", zipfile.ZIP_DEFLATED) as dst:
        for i in src.infolist():
            dst.writestr(i.filename, src.read(i.filename))
    raw = bytearray(broken.read_bytes())
    with zipfile.ZipFile(broken) as zf:
        info = zf.getinfo(next(n for n in zf.namelist() if n.endswith("/archive_format")))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start:start + info.compress_size] = b"\xff" * info.compress_size
    broken.write_bytes(bytes(raw))
    with pytest.raises(Rejected, match=r"could not be read as a \.pt2 archive \(torch\.export"
                                       r"\.save\) \(error: "):
        filechecks.check_model(broken, None, LIMIT)


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros(3, dtype=[("a", "<f4")])}, "holds .* values: a dataset's arrays hold numbers"),
    ({"x": np.zeros((3, 2), np.float32), "y": np.array(["a", "b", "c"])}, "holds <U1 values"),
    ({"x": np.zeros((3, 2), np.float32), "y": np.zeros(4, np.int64)}, "same number of samples"),
    ({"x": np.float32(1.0)}, "'x' is a scalar"),
])
def test_datasets_a_worker_could_not_load_are_rejected(tmp_path: Path, arrays: dict[str, Any],
                                                       message: str) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    with pytest.raises(Rejected, match=message):
        filechecks.check_dataset(p, None, LIMIT)


def test_dataset_bytes_of_no_known_format_say_what_to_send(tmp_path: Path) -> None:
    import pickle

    p = tmp_path / "d"
    p.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(Rejected, match=r"an \.npz archive .* or a \.safetensors file; the bytes "
                                       r"sent are neither \(it looks like a pickle"):
        filechecks.check_dataset(p, None, LIMIT)
    ckpt = tmp_path / "ckpt"
    torch.save({"x": torch.zeros(2)}, ckpt)
    with pytest.raises(Rejected, match=r"torch\.save checkpoint .* numpy\.savez"):
        filechecks.check_dataset(ckpt, None, LIMIT)
    bf16 = tmp_path / "bf16.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3, dtype=torch.bfloat16)}, str(bf16))
    with pytest.raises(Rejected, match="unsupported dtype or shape \\(BF16; accepted: BOOL"):
        filechecks.check_dataset(bf16, None, LIMIT)
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((4, 3), np.float32), y=np.arange(4))
    assert filechecks.check_dataset(good, None, LIMIT)[0] == "npz"
