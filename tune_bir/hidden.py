"""Data in "hidden" space: pixels (MNIST) or frozen conv features (CIFAR), cached once on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tune_bir.data import Protocol, Split
from tune_bir.nets import ConvLayers

EVAL_BATCH = 1000


@dataclass
class HiddenData:
    """Per-task train / val / test inputs in the space the fc network sees, on one device."""

    train: list[Split]
    val: list[Split]
    test: list[Split]
    in_shape: tuple[int, ...]
    image_pixels: int          # P: image pixels, even for feature replay (docs/algorithm.md "Variational loss")
    n_classes: int
    classes_per_task: int


@torch.no_grad()
def _through_conv(conv: ConvLayers | None, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if conv is None:
        return x.to(device)
    if len(x) == 0:
        return torch.empty(0, *ConvLayers.out_shape, device=device)
    # conv layers are frozen (eval, no grad): their features of real images are deterministic -> cache
    return torch.cat([conv(x[i:i + EVAL_BATCH].to(device)) for i in range(0, len(x), EVAL_BATCH)])


def prepare_hidden_data(protocol: Protocol, conv: ConvLayers | None, device: torch.device) -> HiddenData:
    """Move a protocol onto the device, through the frozen conv layers when there are any."""
    def convert(splits):
        return [Split(_through_conv(conv, s.x, device), s.y.to(device)) for s in splits]

    in_shape = ConvLayers.out_shape if conv is not None else tuple(protocol.image_shape)
    return HiddenData(convert(protocol.train), convert(protocol.val), convert(protocol.test),
                      tuple(in_shape), int(torch.tensor(protocol.image_shape).prod()),
                      protocol.n_classes, protocol.classes_per_task)
