"""``restore_layers`` on exported programs whose linear calls are not plain ``nn.Linear``s: a
custom module holding its weight beside other parameters or submodules, a bias that is another
parameter than the module's ``bias``, one weight called twice."""

from __future__ import annotations

import torch
from torch import nn

from workers.engine.graph_layers import restore_layers
from workers.engine.quant.fake import simulate
from workers.engine.quant.formats import LayerFormat
from workers.engine.quant.task import quantizable_layers


class Scaled(nn.Module):
    """A weight used through ``F.linear``, with a gain and a norm beside it, and a bias the
    call takes from another parameter than ``bias`` (which is added after)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16))
        self.shift = nn.Parameter(torch.randn(16))
        self.bias = nn.Parameter(torch.randn(16))
        self.gain = nn.Parameter(torch.rand(16) + 0.5)
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.shift) + self.bias
        out: torch.Tensor = self.norm(y) * self.gain
        return out


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Scaled()
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.shared(torch.relu(self.shared(self.block(x))))  # one layer, called twice
        out: torch.Tensor = self.head(h)
        return out


def test_layers_inside_custom_modules_are_restored_and_quantizable() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    net = Net().eval()
    gm = torch.export.export(net, (x,)).module()
    with torch.no_grad():
        want = gm(x)
        params = sum(p.numel() for p in gm.parameters())
    model = restore_layers(gm)  # type: ignore[arg-type]
    layers = quantizable_layers(model)
    assert sorted(layers) == ["block.linear", "head", "shared"]
    block = layers["block.linear"]
    assert isinstance(block, nn.Linear) and block.bias is not None
    with torch.no_grad():
        assert torch.equal(model(x), want)
        # The layer's bias is the parameter the call used, and no weight is held twice.
        assert torch.equal(block.bias, net.block.shift)
        assert sum(p.numel() for p in model.parameters()) == params
        held = dict(model.get_submodule("block").named_parameters(recurse=False))
        assert sorted(held) == ["bias", "gain"]
        with simulate(layers, {"block.linear": LayerFormat("int4", group_size=16)}):
            quantized = model(x)
    assert not torch.equal(quantized, want)  # the restored layer is the one that runs
