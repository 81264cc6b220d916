"""Checks that an uploaded file is what it claims to be, without executing anything in it.

User files are never unpickled. Each check reads only archive directories, JSON headers and
array headers, and rejects anything that would make a loader fall back to pickle.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

import numpy as np

from app.schemas import DatasetFormat, ModelFormat, TensorInfo

MAX_COMPRESSION_RATIO = 200  # a deflate ratio far beyond real weights: a zip bomb
MAX_MEMBERS = 10_000
SAFETENSORS_DTYPES = {  # bytes per element
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".h5", ".msgpack"}
HF_ALLOWED_SUFFIXES = {".json", ".safetensors", ".txt", ".model", ".md", ".jinja"}
# What a dataset's arrays may hold: numbers NumPy loads and torch takes (no bf16 or fp8 in NumPy).
DATASET_KINDS = "biuf"  # bool, int, uint, float
DATASET_SAFETENSORS_DTYPES = {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"}
# What parsing a malformed file raises where no check catches it first: the file is bad, not us.
# RecursionError: json.loads of a document nested thousands deep.
_MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError, EOFError,
              struct.error, zipfile.BadZipFile, zlib.error, NotImplementedError, RecursionError)
IGNORE_INDEX = -100  # a label that marks a position to skip (torch's cross_entropy default)
_LABEL_CHUNK = 1 << 20  # elements read at a time when scanning labels
_SAFETENSORS_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                      "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}

_PT2_MEMBER = re.compile(
    r"^[^/]+/("
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[\w.-]+\.json|data/weights/[\w.-]+|data/constants/[\w.-]+"
    r"|data/sample_inputs/[\w.-]+\.pt"
    r")$"
)


class Rejected(ValueError):
    """The file is not acceptable; the message says why and what to send instead."""


def check_model(path: Path, fmt: ModelFormat | None, max_unpacked: int
                ) -> tuple[ModelFormat, dict[str, Any]]:
    """The model's format (``fmt``, or detected) and what its check read from it."""
    with _malformed("a .pt2 archive or a zipped Hugging Face folder"):
        kind = fmt if fmt is not None else detect_model_format(path)
    what = "a .pt2 archive (torch.export.save)" if kind == "pt2" else "a zipped Hugging Face folder"
    with _malformed(what):
        return kind, (check_pt2 if kind == "pt2" else check_hf_zip)(path, max_unpacked)


def check_dataset(path: Path, fmt: DatasetFormat | None, max_unpacked: int
                  ) -> tuple[DatasetFormat, dict[str, TensorInfo]]:
    """The dataset's format and tensors, checked as a worker will load them: numeric arrays of at
    least one dimension that all share their first (sample) dimension."""
    kind = fmt if fmt is not None else detect_dataset_format(path)
    what = "an .npz archive" if kind == "npz" else "a .safetensors file"
    with _malformed(what):
        tensors = (check_npz(path, max_unpacked) if kind == "npz"
                   else check_safetensors(path, dataset=True))
    counts = {name: t.shape[0] if t.shape else None for name, t in tensors.items()}
    for name, n in counts.items():
        if n is None:
            raise Rejected(f"array {name!r} is a scalar: every array needs a first dimension "
                           "that counts the samples")
    if len(set(counts.values())) > 1:
        raise Rejected(f"every array must have the same number of samples (first dimension); "
                       f"got {counts}")
    if 0 in counts.values():  # a job would evaluate nothing and report a meaningless baseline
        raise Rejected("the dataset has no samples (its arrays' first dimension is 0)")
    # Workers take `y`, else `labels`, as the labels (workers/engine/datasets.py); the rest are
    # inputs.
    label = "y" if "y" in tensors else "labels" if "labels" in tensors else None
    if label is not None:
        if len(tensors) == 1:
            raise Rejected(f"the dataset has no input tensors, only labels {label!r}: save the "
                           "inputs beside them, numpy.savez('data.npz', x=inputs, y=labels)")
        with _malformed(what):
            _check_labels(path, kind, label)
    with _malformed(what):
        for name, info in tensors.items():
            if name != label:
                _check_no_nan(path, kind, name, math.prod(info.shape[1:]))
    return kind, tensors


def _check_no_nan(path: Path, kind: str, name: str, per_sample: int) -> None:
    """Every job's worker refuses inputs that hold NaN (NaN in, NaN out: a metric of NaN
    compares false with everything); so is the upload, rather than each job that uses it.
    Infinities pass, as in the workers: -inf is how an additive attention mask says "never"."""
    with _open_array(path, kind, name) as (dtype, fh, count):
        if dtype.kind != "f":
            return
        seen = 0
        for chunk in _read_chunks(fh, dtype, count):
            bad = np.flatnonzero(np.isnan(chunk))
            if bad.size:
                first = (seen + int(bad[0])) // max(per_sample, 1)
                raise Rejected(f"input {name!r} holds NaN values (first at sample {first}): "
                               "a job would compute NaN metrics from them, so every job refuses "
                               "them; replace them with numbers (numpy.nan_to_num) or drop those "
                               "samples")
            seen += chunk.size


def _check_labels(path: Path, kind: str, name: str) -> None:
    """Labels are class indices: every metric that reads them (accuracy, perplexity, the
    cross-entropy of sensitivity and training) casts them to int64, so a float label would be
    truncated silently (0.5 -> class 0), and a negative one matches no class and fails the
    cross-entropy; but IGNORE_INDEX (-100) marks positions to skip (padding), as in PyTorch and
    Hugging Face. cosine and mse compare with the float model's outputs and never read labels.
    The upper bound (the model's class count) is the job's to check: it needs the model."""
    with _open_array(path, kind, name) as (dtype, fh, count):
        if dtype.kind not in "biu":
            raise Rejected(f"labels {name!r} hold {dtype} values: labels are integer class "
                           f"indices; if these are whole numbers, store them as integers "
                           f"(numpy.rint(labels).astype('int64') once you have checked that), "
                           "and if they are not class indices, leave them out (metric cosine or "
                           "mse compares with the float model's outputs instead)")
        if dtype.kind != "i":
            return
        for chunk in _read_chunks(fh, dtype, count):
            bad = chunk[(chunk < 0) & (chunk != IGNORE_INDEX)]
            if bad.size:
                raise Rejected(f"labels {name!r} hold the negative label {int(bad[0])}: labels "
                               f"are class indices 0, 1, ..., or {IGNORE_INDEX} for a position "
                               "to skip")


@contextmanager
def _open_array(path: Path, kind: str, name: str
                ) -> Iterator[tuple[np.dtype[Any], IO[bytes], int]]:
    """Array ``name`` of a checked dataset: its dtype, a stream at its first value, and its
    number of values (read in chunks from there: a large array is never held whole)."""
    if kind == "npz":
        with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as fh:
            shape, dtype = _npy_header(fh)
            yield dtype, fh, math.prod(shape)
        return
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        meta = json.loads(fh.read(n))[name]
        dtype = np.dtype(_SAFETENSORS_NUMPY[meta["dtype"]])
        start, end = meta["data_offsets"]
        fh.seek(8 + n + start)
        yield dtype, fh, (end - start) // dtype.itemsize


def _npy_header(fh: IO[bytes]) -> tuple[tuple[int, ...], np.dtype[Any]]:
    version = np.lib.format.read_magic(fh)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read(fh)
    return shape, dtype


def _read_chunks(fh: IO[bytes], dtype: np.dtype[Any], count: int) -> Iterator[Any]:
    while count > 0:
        k = min(count, _LABEL_CHUNK)
        raw = fh.read(k * dtype.itemsize)
        if len(raw) != k * dtype.itemsize:
            raise Rejected("an array ends before its declared shape")
        yield np.frombuffer(raw, dtype)
        count -= k


@contextmanager
def _malformed(what: str) -> Iterator[None]:
    """A parse error no check anticipated still rejects the file (a 422), never a server error."""
    try:
        yield
    except Rejected:
        raise
    except _MALFORMED as exc:
        raise Rejected(f"the upload could not be read as {what} ({type(exc).__name__}: {exc})"
                       ) from None


def _json_member(zf: zipfile.ZipFile, name: str) -> Any:
    try:
        return json.loads(zf.read(name))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejected(f"{name!r} is not valid JSON: {exc}") from None
    except RecursionError:
        raise Rejected(f"{name!r} is not valid JSON: nested too deeply") from None


def check_archive(zf: zipfile.ZipFile, max_unpacked: int) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise Rejected(f"archive has {len(infos)} members; at most {MAX_MEMBERS} are accepted")
    total = 0
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name).parts
        if name.startswith("/") or "\\" in name or ".." in parts or ":" in name:
            raise Rejected(f"archive member {name!r} has an unsafe path")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise Rejected(f"archive member {name!r} is a symbolic link")
        if info.flag_bits & 0x1:  # zipfile would refuse to read it without a password
            raise Rejected(f"archive member {name!r} is encrypted: encrypted archives are not "
                           "accepted; zip the files without a password")
        total += info.file_size
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > 1024 * 1024 and ratio > MAX_COMPRESSION_RATIO:
            raise Rejected(f"archive member {name!r} expands {ratio:.0f}x: refusing a zip bomb")
    if total > max_unpacked:
        raise Rejected(f"archive unpacks to {total} bytes, over the limit of {max_unpacked}")
    return infos


def _open_zip(path: Path, what: str) -> zipfile.ZipFile:
    if not zipfile.is_zipfile(path):
        with path.open("rb") as fh:
            head = fh.read(9)
        hint = ""
        if head[:1] == b"\x80":
            hint = " (it looks like a pickle, which is never loaded)"
        elif head[8:9] == b"{":  # an 8-byte header length, then the JSON header
            hint = " (it looks like a .safetensors file: upload it with format=safetensors)"
        raise Rejected(f"{what} must be a zip archive{hint}")
    return zipfile.ZipFile(path)


def check_pt2(path: Path, max_unpacked: int) -> dict[str, Any]:
    """A ``torch.export.save`` archive whose weights, constants and inputs load without pickle."""
    with _open_zip(path, "a .pt2 model (torch.export.save)") as zf:
        infos = check_archive(zf, max_unpacked)
        names = [i.filename for i in infos if not i.is_dir()]
        if _is_torch_save(names):
            raise Rejected(TORCH_SAVE_HINT)
        for name in names:
            if not _PT2_MEMBER.match(name):
                raise Rejected(
                    f"unexpected member {name!r} in .pt2 archive: only programs saved by "
                    "torch.export.save (no AOTInductor binaries or extra files) are accepted"
                )
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1:
            raise Rejected(".pt2 archive must have exactly one top-level folder")
        root = roots.pop()
        if f"{root}/models/model.json" not in names:
            raise Rejected(".pt2 archive has no models/model.json: save it with torch.export.save")
        if f"{root}/archive_format" not in names:
            raise Rejected(".pt2 archive has no archive_format: save it with torch.export.save")
        if zf.read(f"{root}/archive_format").decode(errors="replace").strip() != "pt2":
            raise Rejected(".pt2 archive_format is not 'pt2'")
        _check_program(_json_member(zf, f"{root}/models/model.json"))
        counts = {}
        for section in ("weights", "constants"):
            cfg_name = f"{root}/data/{section}/model_{section}_config.json"
            if cfg_name not in names:
                counts[section] = 0
                continue
            doc = _json_member(zf, cfg_name)
            config = doc.get("config") if isinstance(doc, dict) else None
            if not isinstance(config, dict):
                raise Rejected(f"{cfg_name!r} has no 'config' object: save it with "
                               "torch.export.save")
            for fqn, meta in config.items():
                if not isinstance(meta, dict):
                    raise Rejected(f"{section[:-1]} {fqn!r} has unreadable metadata in the .pt2")
                if meta.get("use_pickle"):
                    raise Rejected(f"{section[:-1]} {fqn!r} is pickled inside the .pt2; re-export "
                                   "with plain tensors")
                if section == "constants" and not str(meta.get("path_name", "")).startswith(
                    "tensor_"
                ):
                    raise Rejected(f"constant {fqn!r} is not a plain tensor (script or opaque "
                                   "objects are pickled and not accepted)")
                _check_stored_tensor(zf, names, f"{root}/data/{section}", section[:-1], fqn, meta)
            counts[section] = len(config)
        for name in names:
            if "/data/sample_inputs/" in name:
                _load_weights_only(zf.read(name), name)
        return {"weights": counts["weights"], "constants": counts["constants"]}


def _check_program(doc: Any) -> None:
    """models/model.json has the shape torch.export.save writes (torch/_export/serde/schema.py,
    ExportedProgram), so a file that merely has the right names fails here with a message, not
    in a worker with an opaque deserialization error. Structure only: nothing is deserialized."""
    from torch._export.serde.schema import SCHEMA_VERSION

    def need(obj: Any, keys: dict[str, type], where: str) -> dict[str, Any]:
        if not isinstance(obj, dict):
            raise Rejected(f"models/model.json is not an exported program: {where} is not a "
                           "JSON object; save the model with torch.export.save")
        for key, kind in keys.items():
            if not isinstance(obj.get(key), kind):
                raise Rejected(f"models/model.json is not an exported program: {where} has no "
                               f"{key!r} {kind.__name__}; save the model with torch.export.save")
        return obj

    top = need(doc, {"graph_module": dict, "opset_version": dict, "range_constraints": dict,
                     "schema_version": dict}, "the document")
    gm = need(top["graph_module"], {"graph": dict, "signature": dict, "module_call_graph": list},
              "graph_module")
    need(gm["graph"], {"inputs": list, "outputs": list, "nodes": list}, "graph_module.graph")
    need(gm["signature"], {"input_specs": list, "output_specs": list}, "graph_module.signature")
    version = need(top["schema_version"], {"major": int, "minor": int}, "schema_version")
    # torch.export.load refuses another major version (0.0 is its "unversioned" exception).
    if version["major"] not in (SCHEMA_VERSION[0], 0):
        raise Rejected(f"the .pt2 was saved with export schema version {version['major']}."
                       f"{version['minor']}, which this server's torch (schema "
                       f"{SCHEMA_VERSION[0]}.x) cannot load; re-export it with torch "
                       f"{_torch_version()}")


def _torch_version() -> str:
    import torch

    return str(torch.__version__).split("+", 1)[0]


def _check_stored_tensor(zf: zipfile.ZipFile, names: list[str], folder: str, what: str, fqn: str,
                         meta: dict[str, Any]) -> None:
    """The tensor's data file exists and holds every byte its declared view reads: a truncated
    or mismatched weight would otherwise fail, obscurely, only when a worker loads the model."""
    member = f"{folder}/{meta.get('path_name')}"
    if member not in names:
        raise Rejected(f"{what} {fqn!r}: its data file {member.split('/', 1)[1]!r} is missing from "
                       "the .pt2")
    needed = _view_bytes(meta.get("tensor_meta"), f"{what} {fqn!r}")
    held = zf.getinfo(member).file_size
    if needed is not None and needed > held:
        raise Rejected(f"{what} {fqn!r}: its declared shape and strides read {needed} bytes but "
                       f"the archive holds {held}; re-export the model")


def _view_bytes(meta: Any, what: str) -> int | None:
    """Bytes of storage a serialized tensor view reads: (offset + the strided span) x element
    size; None where a size is symbolic."""
    from torch._export.serde.schema import ScalarType
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    try:
        dtype = _SERIALIZE_TO_TORCH_DTYPE[ScalarType(meta["dtype"])]
        dims = [(d.get("as_int"), s.get("as_int")) for d, s in zip(meta["sizes"], meta["strides"],
                                                                   strict=True)]
        offset = meta["storage_offset"].get("as_int")
    except (KeyError, TypeError, ValueError, AttributeError):
        raise Rejected(f"{what} has unreadable tensor metadata in the .pt2") from None
    if offset is None or any(n is None or st is None for n, st in dims):
        return None
    if any(not isinstance(v, int) or v < 0 for v in (offset, *(x for d in dims for x in d))):
        raise Rejected(f"{what} has a negative or non-integer size, stride or offset")
    if any(n == 0 for n, _ in dims):
        return 0
    span: int = offset + sum((n - 1) * st for n, st in dims) + 1
    return span * int(dtype.itemsize)


def _load_weights_only(data: bytes, name: str) -> None:
    # torch.export.load tries weights_only=True first and falls back to full pickle on failure;
    # proving the safe load succeeds here means the unsafe fallback is never reached.
    import torch

    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:
        raise Rejected(f"{name!r} does not load with weights_only=True: {exc}") from None


def check_hf_zip(path: Path, max_unpacked: int) -> dict[str, Any]:
    """A zipped Hugging Face model folder with safetensors weights and no remote code."""
    with _open_zip(path, "a Hugging Face model folder (zipped)") as zf:
        infos = check_archive(zf, max_unpacked)
        files = [i.filename for i in infos if not i.is_dir()]
        prefix = _common_folder(files)
        rel = [f[len(prefix):] for f in files]
        for name in rel:
            suffix = PurePosixPath(name).suffix.lower()
            if suffix in PICKLE_SUFFIXES:
                raise Rejected(f"{name!r}: pickle-based weights are never loaded; convert the "
                               "model to safetensors (model.save_pretrained(safe_serialization=True))")
            if suffix == ".py":
                raise Rejected(f"{name!r}: models with their own code are not accepted")
            if suffix not in HF_ALLOWED_SUFFIXES:
                raise Rejected(f"{name!r}: unexpected file type in a model folder")
        if "config.json" not in rel:
            raise Rejected("the model folder has no config.json at its top level")
        if not any(n.endswith(".safetensors") for n in rel):
            raise Rejected("the model folder has no .safetensors weights")
        config = _json_member(zf, prefix + "config.json")
        if not isinstance(config, dict) or "model_type" not in config:
            raise Rejected("config.json has no model_type")
        if "auto_map" in config:
            raise Rejected("config.json asks for remote code (auto_map); not accepted")
        for name in rel:
            if name.endswith(".safetensors"):
                with zf.open(prefix + name) as fh:
                    _safetensors_header(fh, zf.getinfo(prefix + name).file_size, repr(name))
        if "tokenizer.json" not in rel and "vocab.txt" not in rel:
            raise Rejected("the model folder has no tokenizer (tokenizer.json or vocab.txt): "
                           "save it beside the model, tokenizer.save_pretrained(folder)")
        return {
            "model_type": config["model_type"],
            "architectures": config.get("architectures") or [],
            "max_position_embeddings": config.get("max_position_embeddings"),
        }


def _common_folder(files: list[str]) -> str:
    tops = {f.split("/", 1)[0] for f in files}
    if len(tops) == 1 and all("/" in f for f in files):
        return tops.pop() + "/"
    return ""


def _safetensors_header(fh: IO[bytes], size: int, name: str,
                        dtypes: Iterable[str] = SAFETENSORS_DTYPES) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares; ``name`` is how messages call the file."""
    raw = fh.read(8)
    if len(raw) != 8:
        raise Rejected(f"{name} is not a safetensors file")
    (n,) = struct.unpack("<Q", raw)
    if n > min(size - 8, 100 * 1024 * 1024):
        raise Rejected(f"{name} has an invalid safetensors header length")
    try:
        header = json.loads(fh.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Rejected(f"{name} has a corrupt safetensors header") from None
    except RecursionError:
        raise Rejected(f"{name} has a corrupt safetensors header (JSON nested too deeply)"
                       ) from None
    if not isinstance(header, dict):
        raise Rejected(f"{name} has a safetensors header that is not a JSON object")
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise Rejected(f"{name}: tensor {key!r} has no dtype, shape and data_offsets")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in dtypes or not isinstance(shape, list):
            raise Rejected(f"{name}: tensor {key!r} has an unsupported dtype or shape "
                           f"({dtype}; accepted: {', '.join(sorted(dtypes))})")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise Rejected(f"{name}: tensor {key!r} points outside the file")
        if any(not isinstance(d, int) or d < 0 for d in shape):
            raise Rejected(f"{name}: tensor {key!r} has an invalid shape {shape}")
        needed = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if needed != offsets[1] - offsets[0]:
            raise Rejected(f"{name}: tensor {key!r} of shape {shape} needs {needed} bytes but "
                           f"holds {offsets[1] - offsets[0]}")
        out[key] = TensorInfo(shape=shape, dtype=dtype.lower())
    return out


def check_safetensors(path: Path, dataset: bool = False) -> dict[str, TensorInfo]:
    """An uploaded ``.safetensors`` file (``dataset``: of arrays NumPy can load)."""
    dtypes = DATASET_SAFETENSORS_DTYPES if dataset else SAFETENSORS_DTYPES
    with path.open("rb") as fh:
        tensors = _safetensors_header(fh, path.stat().st_size, "the upload", dtypes)
    if not tensors:
        raise Rejected("the safetensors file holds no tensors")
    return tensors


def check_npz(path: Path, max_unpacked: int) -> dict[str, TensorInfo]:
    """A NumPy ``.npz`` of plain arrays (no object arrays, so no pickle)."""
    with _open_zip(path, "an .npz dataset") as zf:
        check_archive(zf, max_unpacked)
        if _is_torch_save(zf.namelist()):
            raise Rejected("this is a torch.save checkpoint (a pickle), and pickles are never "
                           "loaded: save the arrays with numpy.savez('data.npz', x=inputs, "
                           "y=labels) or as a .safetensors file")
        out: dict[str, TensorInfo] = {}
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise Rejected(f"unexpected member {info.filename!r} in .npz")
            with zf.open(info) as fh:
                try:
                    shape, dtype = _npy_header(fh)
                except ValueError as exc:
                    raise Rejected(f"{info.filename!r} is not a valid .npy array: {exc}") from None
                held = info.file_size - fh.tell()
            if dtype.hasobject:
                raise Rejected(f"{info.filename!r} holds Python objects (pickle); not accepted")
            if dtype.fields is not None or dtype.kind not in DATASET_KINDS:
                raise Rejected(f"{info.filename!r} holds {dtype} values: a dataset's arrays hold "
                               "numbers (bool, integer or floating point)")
            needed = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
            if needed != held:
                raise Rejected(f"{info.filename!r}: shape {list(shape)} of {dtype} needs {needed} "
                               f"bytes but the array holds {held}")
            out[info.filename[: -len(".npy")]] = TensorInfo(shape=list(shape), dtype=str(dtype))
    if not out:
        raise Rejected("the .npz holds no arrays")
    return out


def detect_dataset_format(path: Path) -> Literal["npz", "safetensors"]:
    """An ``.npz`` is a zip archive; a ``.safetensors`` file starts with its header's 8-byte
    length and the header's ``{``."""
    if zipfile.is_zipfile(path):
        return "npz"
    with path.open("rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    hint = " (it looks like a pickle, which is never loaded)" if head[:1] == b"\x80" else ""
    raise Rejected("a dataset must be an .npz archive (numpy.savez('data.npz', x=inputs, "
                   f"y=labels)) or a .safetensors file; the bytes sent are neither{hint}")


def detect_model_format(path: Path) -> Literal["pt2", "hf"]:
    if not zipfile.is_zipfile(path):
        raise Rejected("a model upload must be a .pt2 archive or a zipped Hugging Face folder; "
                       "the bytes sent are neither (pickles are never accepted)")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    if any(n.endswith("/models/model.json") for n in names):
        return "pt2"
    if any(n == "config.json" or n.endswith("/config.json") for n in names):
        return "hf"
    if _is_torch_save(names):
        raise Rejected(TORCH_SAVE_HINT)
    raise Rejected("zip is neither a torch.export .pt2 nor a Hugging Face folder (no config.json)")


TORCH_SAVE_HINT = ("this is a torch.save checkpoint (a pickle), and pickles are never accepted: "
                   "upload torch.export.save(torch.export.export(model, example_inputs), "
                   "'model.pt2') instead, or a Hugging Face folder with safetensors weights")


def _is_torch_save(names: list[str]) -> bool:
    """torch.save's zip: <name>/data.pkl beside <name>/data/<n> storages."""
    return any(n.endswith("/data.pkl") for n in names) and not any(
        n.endswith("/models/model.json") for n in names)
