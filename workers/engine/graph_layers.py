"""Give an exported program's linear and convolution calls back their modules.

``ExportedProgram.module()`` keeps parameters on plain containers and calls ``aten.linear`` /
``aten.conv1d`` / ``aten.conv2d`` as functions, so nothing in it is an ``nn.Linear``: per-layer
hooks (timing, simulated quantization) would find no layers. Each such call whose weight (and
bias, if any) is a parameter is rewritten into a call of an ``nn.Linear`` / ``nn.Conv1d`` /
``nn.Conv2d`` that holds the very same parameters. The layer takes the container's place where
the container holds nothing else the graph reads; otherwise (a custom module with more
parameters or submodules beside its weight) it becomes a child of the container, and the
parameters it took over leave the container.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

_LINEAR = torch.ops.aten.linear.default
_CONVS: dict[object, type[nn.Conv1d] | type[nn.Conv2d]] = {
    torch.ops.aten.conv1d.default: nn.Conv1d, torch.ops.aten.conv2d.default: nn.Conv2d}


def _param_path(node: object) -> str | None:
    if isinstance(node, fx.Node) and node.op == "get_attr" and str(node.target).endswith(".weight"):
        return str(node.target)[: -len(".weight")]
    return None


def _attr(gm: fx.GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _child_name(holder: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(holder, name):
        name, i = f"{base}_{i}", i + 1
    return name


def restore_layers(gm: fx.GraphModule) -> fx.GraphModule:
    changed = False
    made: dict[tuple[str, str | None], str] = {}  # (weight, bias) targets -> the layer's path
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or (node.target != _LINEAR and node.target not in _CONVS):
            continue
        path = _param_path(node.args[1])
        if path is None:
            continue
        bias_arg = node.args[2] if len(node.args) > 2 else None
        if bias_arg is not None and not (isinstance(bias_arg, fx.Node)
                                         and bias_arg.op == "get_attr"):
            continue  # a bias computed in the graph: no layer can hold it
        bias_target = None if bias_arg is None else str(bias_arg.target)
        key = (f"{path}.weight", bias_target)
        if key not in made:
            layer = _layer(gm, node, path, bias_target)
            if layer is None:
                continue
            made[key] = _place(gm, path, bias_target, layer)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(made[key], (node.args[0],))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        # Parameters a layer took over as a child of their container are that layer's now
        # (the container's copy would be stored twice, and quantized only in the layer).
        read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        for (weight, bias), where in made.items():
            owner = weight.rpartition(".")[0]
            if where == owner:  # the layer took the container's place
                continue
            holder = gm.get_submodule(owner)
            for target in (weight, bias):
                if target is None or target in read or target.rpartition(".")[0] != owner:
                    continue
                holder._parameters.pop(target.rpartition(".")[2], None)
        gm.recompile()
    return gm


def _layer(gm: fx.GraphModule, node: fx.Node, path: str, bias_target: str | None
           ) -> nn.Module | None:
    weight = gm.get_submodule(path).weight
    bias = None if bias_target is None else _attr(gm, bias_target)
    if not isinstance(weight, nn.Parameter) or not isinstance(bias, nn.Parameter | None):
        return None  # a constant (a buffer): a layer holds parameters
    layer: nn.Module
    if node.target == _LINEAR:
        layer = nn.Linear(int(weight.shape[1]), int(weight.shape[0]), bias=bias is not None)
    else:
        args: list[Any] = list(node.args[3:7])
        stride, padding, dilation, groups = args + [1, 0, 1, 1][len(args):]
        if isinstance(padding, str):
            return None
        kernel: Any = tuple(int(k) for k in weight.shape[2:])  # 1 or 2 long, by the op
        layer = _CONVS[node.target](int(weight.shape[1]) * int(groups), int(weight.shape[0]),
                                    kernel, stride=stride, padding=padding, dilation=dilation,
                                    groups=int(groups), bias=bias is not None)
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


def _place(gm: fx.GraphModule, path: str, bias_target: str | None, layer: nn.Module) -> str:
    """Put ``layer`` in the module tree; returns its path. In the container's place where the
    graph reads nothing else of the container, else as a new child of it."""
    holder = gm.get_submodule(path)
    mine = {f"{path}.weight", *([bias_target] if bias_target is not None else [])}
    others = {str(n.target) for n in gm.graph.nodes
              if n.op == "get_attr" and str(n.target).startswith(path + ".")} - mine
    alone = (not others and not list(holder.children())
             and (bias_target is None or bias_target == f"{path}.bias"))
    if alone:
        parent, _, leaf = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, layer)
        return path
    kind = "linear" if isinstance(layer, nn.Linear) else "conv"
    name = _child_name(holder, kind)
    holder.add_module(name, layer)
    return f"{path}.{name}"
