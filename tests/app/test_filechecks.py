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


# ---- defects found against a live API: each was a 500 or an upload accepted that no job can use


def _hf_zip(path: Path, config: bytes) -> Path:
    from safetensors.torch import save

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("m/config.json", config)
        zf.writestr("m/vocab.txt", b"[PAD]\n")
        zf.writestr("m/model.safetensors", save({"w": torch.zeros(2)}))
    return path


def test_deeply_nested_json_is_rejected_not_a_recursion_error(tmp_path: Path) -> None:
    deep_obj = b'{"x":' * 50_000 + b"1" + b"}" * 50_000
    deep_list = b"[" * 100_000 + b"]" * 100_000
    st = tmp_path / "d.safetensors"
    st.write_bytes(struct.pack("<Q", len(deep_obj)) + deep_obj)
    with pytest.raises(Rejected, match=r"corrupt safetensors header .*nested too deeply"):
        filechecks.check_dataset(st, None, LIMIT)
    hf = _hf_zip(tmp_path / "hf.zip", deep_list)
    with pytest.raises(Rejected, match=r"'m/config\.json' is not valid JSON: nested too deeply"):
        filechecks.check_model(hf, None, LIMIT)
    pt2 = _pt2_member(export_tiny(tmp_path / "m.pt2"), tmp_path / "deep.pt2",
                      "/model_weights_config.json", deep_list)
    with pytest.raises(Rejected, match=r"model_weights_config\.json' is not valid JSON: nested too deeply"):
        filechecks.check_model(pt2, None, LIMIT)


def _encrypt_flag(src: Path, dst: Path) -> Path:
    """A copy of a stored (uncompressed) zip with the 'encrypted' bit set in every local and
    central header, as a password-protected archive has it."""
    raw = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        infos = zf.infolist()
    for info in infos:
        assert info.compress_type == zipfile.ZIP_STORED
        raw[info.header_offset + 6] |= 1  # local header: general-purpose flags at +6
    cd = raw.find(b"PK\x01\x02")
    while cd != -1:
        raw[cd + 8] |= 1  # central header: general-purpose flags at +8
        cd = raw.find(b"PK\x01\x02", cd + 46)
    dst.write_bytes(bytes(raw))
    return dst


def test_encrypted_archives_are_rejected(tmp_path: Path) -> None:
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.zeros((4, 3), np.float32), y=np.arange(4))
    bad_npz = _encrypt_flag(npz, tmp_path / "enc.npz")
    with pytest.raises(Rejected, match="encrypted archives are not accepted"):
        filechecks.check_dataset(bad_npz, None, LIMIT)
    pt2 = rewrite_zip(export_tiny(tmp_path / "m.pt2"), tmp_path / "stored.pt2",
                      lambda name, data: data)  # rewrite_zip stores members uncompressed
    bad_pt2 = _encrypt_flag(pt2, tmp_path / "enc.pt2")
    with pytest.raises(Rejected, match="encrypted archives are not accepted"):
        filechecks.check_model(bad_pt2, None, LIMIT)


def test_corrupt_central_directory_is_rejected_when_the_format_is_detected(tmp_path: Path
                                                                           ) -> None:
    junk = bytes(range(100))
    # An end-of-central-directory record naming one entry at offset 0, over the junk.
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(junk), 0, 0)
    p = tmp_path / "m.pt2"
    p.write_bytes(junk + eocd)
    for fmt in (None, "pt2", "hf"):
        with pytest.raises(Rejected, match="could not be read as"):
            filechecks.check_model(p, fmt, LIMIT)  # type: ignore[arg-type]


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((0, 1, 8, 8), np.float32), "y": np.zeros(0, np.int64)}, "no samples"),
    ({"x": np.zeros((0, 1, 8, 8), np.float32)}, "no samples"),
    ({"x": np.zeros((3, 2), np.float32), "y": np.array([0.5, 1.0, 2.0])},
     r"labels 'y' hold float64 values: labels are integer class indices"),
    ({"x": np.zeros((3, 2), np.float32), "labels": np.ones(3, np.float32)},
     "labels 'labels' hold float32 values"),
    ({"x": np.zeros((3, 2), np.float32), "y": np.array([0, -1, 2])}, "negative label -1"),
    ({"y": np.arange(3)}, "no input tensors"),
])
def test_datasets_no_job_could_use_are_rejected(tmp_path: Path, arrays: dict[str, Any],
                                                message: str) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    with pytest.raises(Rejected, match=message):
        filechecks.check_dataset(p, None, LIMIT)
    from safetensors.numpy import save_file

    st = tmp_path / "d.safetensors"
    save_file(arrays, str(st))
    with pytest.raises(Rejected, match=message):
        filechecks.check_dataset(st, None, LIMIT)


def test_labels_a_job_can_use_pass(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    n = 3 * 2**20 + 5  # more than one read chunk, with the negative one in the last
    rng = np.random.default_rng(0)  # random: compressed, zeros would look like a zip bomb
    ok = {"x": rng.integers(0, 255, (n, 1), np.uint8), "y": rng.integers(0, 10, n)}
    p = tmp_path / "ok.npz"
    np.savez_compressed(p, **ok)
    assert filechecks.check_dataset(p, None, LIMIT)[1]["y"].shape == [n]
    bad = {"x": ok["x"], "y": ok["y"].copy()}
    bad["y"][-1] = -3
    np.savez_compressed(p, **bad)
    with pytest.raises(Rejected, match="negative label -3"):
        filechecks.check_dataset(p, None, LIMIT)
    st = tmp_path / "bad.safetensors"
    save_file(bad, str(st))
    with pytest.raises(Rejected, match="negative label -3"):
        filechecks.check_dataset(st, None, LIMIT)
    np.savez(p, x=np.zeros((3, 2), np.float32), y=np.array([0, -101, 1]))
    with pytest.raises(Rejected, match="negative label -101"):
        filechecks.check_dataset(p, None, LIMIT)
    np.savez(p, x=np.zeros((3, 2), np.float32), y=np.array([0, -100, 1]))  # the ignore index
    filechecks.check_dataset(p, None, LIMIT)
    # Big-endian, unsigned and bool labels, and a `labels` array that is an input beside `y`:
    # all load as the class indices a job uses.
    for y in (np.array([0, 1, 2], ">i4"), np.array([0, 1, 2], np.uint16),
              np.array([True, False, True])):
        np.savez(p, x=np.zeros((3, 2), np.float32), y=y)
        assert filechecks.check_dataset(p, None, LIMIT)[0] == "npz"
    np.savez(p, x=np.zeros((3, 2), np.float32), y=np.arange(3),
             labels=np.full(3, 0.5, np.float32))
    assert filechecks.check_dataset(p, None, LIMIT)[0] == "npz"
    np.savez(p, x=np.zeros((3, 2), np.float32))  # unlabeled: cosine / mse to the float model
    assert filechecks.check_dataset(p, None, LIMIT)[0] == "npz"


def test_inputs_holding_nan_are_rejected_at_upload(tmp_path: Path) -> None:
    """Every job's worker refuses a dataset whose inputs hold NaN (workers/engine/datasets.py):
    the upload is refused instead of being accepted and failing each job that uses it."""
    from safetensors.numpy import save_file

    n = 2**20 + 7  # more than one read chunk, with the NaN in the last
    x = np.zeros((n, 1), np.float16)
    x[-1, 0] = np.nan
    p, st = tmp_path / "d.npz", tmp_path / "d.safetensors"
    np.savez(p, x=x, y=np.zeros(n, np.int64))
    with pytest.raises(Rejected, match=r"input 'x' holds NaN values \(first at sample 1048582\)"):
        filechecks.check_dataset(p, None, LIMIT)
    save_file({"x": x.astype(np.float32)}, str(st))
    with pytest.raises(Rejected, match="input 'x' holds NaN"):
        filechecks.check_dataset(st, None, LIMIT)
    # infinities pass (an additive attention mask says "never" with -inf), as in the workers;
    # so do NaN-free inputs in any byte order, and a NaN-free float `labels` input beside `y`
    x[-1, 0] = -np.inf
    np.savez(p, x=x.astype(">f8"), y=np.zeros(n, np.int64), labels=np.ones(n, np.float32))
    assert filechecks.check_dataset(p, None, LIMIT)[0] == "npz"


def test_pt2_with_an_empty_model_json_is_rejected(tmp_path: Path) -> None:
    p = tmp_path / "fake.pt2"  # the names of an export, and nothing of a program
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("a/models/model.json", b"{}")
        zf.writestr("a/archive_format", b"pt2")
    with pytest.raises(Rejected, match="not an exported program: the document has no "
                                       "'graph_module'"):
        filechecks.check_model(p, None, LIMIT)


@pytest.mark.parametrize("edit, message", [
    (lambda d: [], "not an exported program: the document is not a JSON object"),
    (lambda d: {k: v for k, v in d.items() if k != "schema_version"}, "schema_version"),
    (lambda d: {**d, "graph_module": {**d["graph_module"], "graph": []}}, "graph"),
    (lambda d: {**d, "graph_module": {**d["graph_module"], "signature": {"input_specs": []}}},
     "signature"),
    (lambda d: {**d, "schema_version": {"major": 999, "minor": 0}}, "schema version 999"),
])
def test_pt2_whose_model_json_is_not_a_program_is_rejected(tmp_path: Path, edit: Any,
                                                           message: str) -> None:
    tiny = export_tiny(tmp_path / "m.pt2")
    with zipfile.ZipFile(tiny) as zf:
        [name] = [n for n in zf.namelist() if n.endswith("/models/model.json")]
        doc = json.loads(zf.read(name))
    bad = _pt2_member(tiny, tmp_path / "bad.pt2", "/models/model.json",
                      json.dumps(edit(doc)).encode())
    with pytest.raises(Rejected, match=message):
        filechecks.check_model(bad, None, LIMIT)
