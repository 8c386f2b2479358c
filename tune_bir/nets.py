"""Building blocks: fully connected layers, context-gated layers, the conv layers "C3-5x16-bn"."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from tune_bir.errors import ConfigError
from tune_bir.safe_load import load_torch_file


def init_uniform_(layer: nn.Linear) -> nn.Linear:
    """U(+-1/sqrt(fan_in)) for weight and bias (docs/algorithm.md "The model")."""
    bound = 1.0 / math.sqrt(layer.in_features)
    nn.init.uniform_(layer.weight, -bound, bound)
    if layer.bias is not None:
        nn.init.uniform_(layer.bias, -bound, bound)
    return layer


def linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    return init_uniform_(nn.Linear(in_features, out_features, bias=bias))


class MLP(nn.Sequential):
    """Linear + ReLU layers of the given sizes (fcE)."""

    def __init__(self, sizes: list[int]):
        layers: list[nn.Module] = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            # in place: the linear layer's backward needs its input, not its output
            layers += [linear(n_in, n_out), nn.ReLU(inplace=True)]
        super().__init__(*layers)

    def forward_keeping_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The forward pass, and each linear layer's input (what `rows_alone` needs)."""
        inputs = []
        for layer in self:
            if isinstance(layer, nn.Linear):
                inputs.append(x)
            x = layer(x)
        return x, tuple(inputs)

    def rows_alone(self, inputs: tuple[torch.Tensor, ...], out: torch.Tensor, rows: slice) -> torch.Tensor:
        """out[rows] of a pass (`forward_keeping_inputs`), the same values on a graph of their own, whose backward
        runs through these rows of the pass only: an objective of some rows (the contrastive plugin's, of the
        replayed ones) then spends no products on the zeros the other rows would get.

        Its gradients are computed by the same operations as the whole pass's, on fewer rows; whether a product
        over fewer rows sums in the same order depends on the matrix library's blocking for the shapes (on an
        Intel Xeon with MKL: the same for 128 + 128 rows, not for 16 + 128). So it is used only where it gives
        the whole pass's gradients bit for bit, checked once per shape, dtype and thread count on a CPU
        (`rows_backward_is_exact`); elsewhere (a GPU, other shapes) and under autocast it is out[rows] itself."""
        linears = [layer for layer in self if isinstance(layer, nn.Linear)]
        if not linears or any(x.dtype != layer.weight.dtype for x, layer in zip(inputs, linears, strict=True)) \
                or not rows_backward_is_exact(linears, out.shape[0], rows, out.device):
            return out[rows]
        return _rows_graph([layer.weight for layer in linears], [layer.bias for layer in linears], inputs, out, rows)


def _rows_graph(weights: list[torch.Tensor], biases: list[torch.Tensor], inputs: tuple[torch.Tensor, ...],
                out: torch.Tensor, rows: slice) -> torch.Tensor:
    """out[rows] on `_RowsAlone`'s graph, from the layers' parameters and a pass's layer inputs and output."""
    outputs = (*inputs[1:], out)   # the ReLU acts in place: a layer's output is the next one's input
    return _RowsAlone.apply(len(weights), out[rows].detach(), *weights, *biases, *(x[rows].detach() for x in inputs),
                            *(y[rows].detach() for y in outputs))


_ROWS_BACKWARD_EXACT: dict[tuple, bool] = {}


def rows_backward_is_exact(linears: list[nn.Linear], n: int, rows: slice, device: torch.device) -> bool:
    """Whether `MLP.rows_alone`'s backward gives the gradients of the whole pass's bit for bit for these layers'
    shapes and `rows` of `n`, here (dtype, threads, matmul precision; on a CPU): tried once on random values of
    those shapes (drawn from a generator of its own: the global stream is left alone)."""
    if device.type != "cpu":
        # the check reads its comparison back to the host, a synchronisation inside a step; a GPU keeps the
        # pass's own backward until a GPU session weighs it (docs/architecture.md "GPU")
        return False
    dtype = linears[0].weight.dtype
    key = (tuple(layer.weight.shape for layer in linears), n, rows.indices(n), device, dtype,
           torch.get_num_threads(), torch.get_float32_matmul_precision())
    if key not in _ROWS_BACKWARD_EXACT:
        g = torch.Generator(device=device).manual_seed(0)
        params = [torch.randn(layer.weight.shape, generator=g, device=device, dtype=dtype).div_(
            math.sqrt(layer.in_features)).requires_grad_() for layer in linears]
        params += [torch.randn(layer.out_features, generator=g, device=device, dtype=dtype).requires_grad_()
                   for layer in linears]
        x = torch.randn(n, linears[0].in_features, generator=g, device=device, dtype=dtype)
        weights, biases = params[:len(linears)], params[len(linears):]
        inputs = []
        for weight, bias in zip(weights, biases, strict=True):
            inputs.append(x)
            x = torch.relu_(nn.functional.linear(x, weight, bias))   # nn.Linear + nn.ReLU(inplace=True)
        target = torch.randn(x[rows].shape, generator=g, device=device, dtype=dtype)
        whole = torch.autograd.grad((x[rows] * target).sum(), params, retain_graph=True)
        by_rows = torch.autograd.grad((_rows_graph(weights, biases, tuple(inputs), x, rows) * target).sum(), params)
        _ROWS_BACKWARD_EXACT[key] = all(torch.equal(a, b) for a, b in zip(whole, by_rows, strict=True))
    return _ROWS_BACKWARD_EXACT[key]


class _RowsAlone(torch.autograd.Function):
    """`MLP.rows_alone`: forward passes the rows through; backward is the Linear + ReLU layers' own backward
    (ReLU's threshold_backward on its output, the products of addmm's backward in their layouts) on those rows."""

    @staticmethod
    def forward(ctx, n_layers: int, out_rows: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.n_layers = n_layers
        weights, inputs, outputs = tensors[:n_layers], tensors[2 * n_layers:3 * n_layers], tensors[3 * n_layers:]
        ctx.save_for_backward(*weights, *inputs, *outputs)
        return out_rows.view_as(out_rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = ctx.n_layers
        saved = ctx.saved_tensors
        weights, inputs, outputs = saved[:n], saved[n:2 * n], saved[2 * n:]
        grad_weights, grad_biases = [None] * n, [None] * n
        for i in reversed(range(n)):
            grad = torch.ops.aten.threshold_backward(grad, outputs[i], 0)
            grad_weights[i] = grad.t().mm(inputs[i])
            grad_biases[i] = grad.sum(0)
            if i:
                grad = grad.mm(weights[i])
        # nothing flows into the pass itself (out_rows, inputs, outputs): that is the point
        return None, None, *grad_weights, *grad_biases, *([None] * (2 * n))


class GatedLinear(nn.Module):
    """Linear layer whose pre-activation is multiplied by a class-chosen binary gate (docs/algorithm.md
    "Gating based on internal context").

    The mask [n_classes x out] is drawn once (0 with probability `gate_prop`) and stored as a buffer,
    so it is part of the state dict (the reference kept it as a plain tensor;
    difference "gate-buffers", docs/algorithm.md).
    """

    def __init__(self, in_features: int, out_features: int, n_classes: int, gate_prop: float,
                 rng: torch.Generator):
        super().__init__()
        self.linear = linear(in_features, out_features)
        keep = torch.rand(n_classes, out_features, generator=rng) >= gate_prop
        self.register_buffer("mask", keep.float())

    def forward(self, x: torch.Tensor, gate_input: torch.Tensor) -> torch.Tensor:
        # in place: the product's backward needs its factors, not the product
        return torch.relu_(self.linear(x) * (gate_input @ self.mask))


class ConvBlock(nn.Module):
    """conv (+ BN) (+ ReLU); attribute names match the published checkpoint's keys."""

    def __init__(self, c_in: int, c_out: int, stride: int, final: bool):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=True)
        self.bn = None if final else nn.BatchNorm2d(c_out)
        self.final = final

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x if self.final else torch.relu(self.bn(x))


class ConvLayers(nn.Module):
    """C3-5x16-bn: 5 conv layers 3->16->32->64->128->256, the last linear; 32x32 -> 256x2x2
    (docs/algorithm.md "Pre-trained conv layers")."""

    channels = (3, 16, 32, 64, 128, 256)
    out_shape = (256, 2, 2)

    def __init__(self):
        super().__init__()
        self.frozen = False
        for i in range(5):
            block = ConvBlock(self.channels[i], self.channels[i + 1], stride=1 if i == 0 else 2, final=i == 4)
            self.add_module(f"convLayer{i + 1}", block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(5):
            x = getattr(self, f"convLayer{i + 1}")(x)
        return x

    @property
    def out_units(self) -> int:
        return math.prod(self.out_shape)

    def train(self, mode: bool = True) -> ConvLayers:
        # frozen layers never leave eval mode: BN keeps the stored running statistics
        # (difference "conv-always-eval", docs/algorithm.md)
        return super().train(mode and not self.frozen)

    def freeze(self) -> ConvLayers:
        """No gradients and eval mode for good."""
        self.requires_grad_(False)
        self.frozen = True
        return self.eval()


def load_conv_layers(path: str | Path, device: torch.device) -> ConvLayers:
    """Load frozen conv layers from ours (`pretrain`) or the original code's file; eval mode, no grad."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"pre-trained conv layers not found at {path}: run `python -m tune_bir.pretrain "
                          f"--experiment CIFAR10` or pass --pretrained-conv PATH")
    blob = load_torch_file(path, "pre-trained conv layers", map_location=device, verify=True)
    state = blob.get("state", blob) if isinstance(blob, dict) else None
    conv = ConvLayers()
    load_matching_state(conv, state, path, "the conv layers C3-5x16-bn")
    return conv.to(device).freeze()


def load_matching_state(module: nn.Module, state: object, path: str | Path, name: str) -> None:
    """Load `state` (read from `path`) into `module` named `name`, or a one-line ConfigError naming the
    first mismatch instead of torch's multi-line key/shape report."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} does not hold a state dict of {name}")
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong_shape:
        detail = (f"missing {missing[:3]}" if missing else
                  f"unexpected {unexpected[:3]}" if unexpected else
                  f"wrong shapes {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong_shape[:2]]}")
        raise ConfigError(f"{path} does not match {name} ({detail}): was it written by another version? "
                          "re-run `python -m tune_bir.pretrain`")
    module.load_state_dict(state)


def adam(params, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam(lr, betas 0.9/0.999, eps 1e-8); the fused kernel where torch has one (one pass over the weights)."""
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type in ("cpu", "cuda"))


def load_aux_decoder(path: str | Path, device: torch.device) -> dict[str, torch.Tensor]:
    """State of the auxiliary decoder that `pretrain --aux-decoder` trained and stored beside the conv layers."""
    path = Path(path).expanduser().resolve()
    blob = load_torch_file(path, "auxiliary decoder (pre-trained conv layers file)", map_location=device,
                           verify=True)
    if not isinstance(blob, dict) or not isinstance(blob.get("aux_decoder"), dict):
        raise ConfigError(f"{path} holds no trained auxiliary decoder: run `python -m tune_bir.pretrain "
                          f"--experiment CIFAR10 --aux-decoder` or use --aux-decoder random")
    return blob["aux_decoder"]
