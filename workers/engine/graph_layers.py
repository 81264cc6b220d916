"""Give an exported program's linear and convolution calls back their modules.

``ExportedProgram.module()`` keeps parameters on plain containers and calls ``aten.linear`` /
``aten.conv2d`` as functions, so nothing in it is an ``nn.Linear``: per-layer hooks (timing,
simulated quantization) would find no layers. Each such call whose weight is a parameter is
rewritten into a call of an ``nn.Linear`` / ``nn.Conv2d`` that holds the very same parameters.
"""

from __future__ import annotations

import torch
from torch import fx, nn

_LINEAR = torch.ops.aten.linear.default
_CONV2D = torch.ops.aten.conv2d.default


def _param_path(node: object) -> str | None:
    if isinstance(node, fx.Node) and node.op == "get_attr" and str(node.target).endswith(".weight"):
        return str(node.target)[: -len(".weight")]
    return None


def restore_layers(gm: fx.GraphModule) -> fx.GraphModule:
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (_LINEAR, _CONV2D):
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
            kernel = (int(weight.shape[2]), int(weight.shape[3]))
            layer = nn.Conv2d(int(weight.shape[1]) * int(groups), int(weight.shape[0]),
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
