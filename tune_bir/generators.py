"""Restoring a torch.Generator's saved state, also on a device of another kind (docs/architecture.md "GPU")."""

from __future__ import annotations

import hashlib
import logging

import torch

log = logging.getLogger(__name__)


def restore_generator(generator: torch.Generator, state: torch.Tensor) -> bool:
    """Set `generator` to a state saved by `get_state()`, wherever the file was loaded to; True.

    A state of another kind of generator (a CUDA Philox state is 16 bytes, a CPU Mersenne Twister one 5056: a
    checkpoint written on a GPU and continued on a CPU, or the reverse) cannot be set: the generator is then
    seeded from a digest of the saved state, deterministic and distinct per stream and position, but not the
    stream the other device would have drawn; False.
    """
    state = state.cpu()   # a checkpoint loaded with map_location=<cuda device> holds it on the GPU
    if state.numel() == generator.get_state().numel():
        generator.set_state(state)
        return True
    digest = hashlib.sha256(state.contiguous().numpy().tobytes()).digest()
    generator.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    log.warning("a %d-byte generator state cannot continue on %s (another kind of generator): reseeded from it",
                state.numel(), generator.device)
    return False
