"""Give an exported program's linear and convolution calls back their modules.

``ExportedProgram.module()`` keeps parameters on plain containers and calls ``aten.linear`` /
``aten.conv1d`` / ``aten.conv2d`` as functions, so nothing in it is an ``nn.Linear``: per-layer
hooks (timing, simulated quantization) would find no layers. Each such call whose weight is a
parameter is rewritten into a call of an ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` that holds
the very same parameters.
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


def restore_layers(gm: fx.GraphModule) -> fx.GraphModule:
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or (node.target != _LINEAR and node.target not in _CONVS):
            continue
        path = _param_path(node.args[1])
        if path is None:
            continue
        holder = gm.get_submodule(path)
        weight = holder.weight
        assert isinstance(weight, torch.Tensor)
        bias = getattr(holder, "bias", None) if len(node.args) > 2 and node.args[2] is not None else None
        if node.target == _LINEAR:
            layer: nn.Module = nn.Linear(int(weight.shape[1]), int(weight.shape[0]),
                                         bias=bias is not None)
        else:
            stride, padding, dilation, groups = (list(node.args[3:7]) + [1, 0, 1, 1][len(node.args[3:7]):])
            if isinstance(padding, str):
                continue
            kernel: Any = tuple(int(k) for k in weight.shape[2:])  # 1 or 2 long, by the op
            layer = _CONVS[node.target](int(weight.shape[1]) * int(groups), int(weight.shape[0]),
                                        kernel, stride=stride, padding=padding,
                                        dilation=dilation, groups=int(groups), bias=bias is not None)
        layer.weight = weight
        if bias is not None:
            layer.bias = bias
        parent, _, leaf = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, layer)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (node.args[0],))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm
