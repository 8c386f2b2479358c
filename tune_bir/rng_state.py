"""A random stream's (torch.Generator's) saved state restored on any device (docs/architecture.md "GPU")."""

from __future__ import annotations

import hashlib
import logging

import torch

log = logging.getLogger(__name__)


def restore_rng(rng: torch.Generator, state: torch.Tensor) -> bool:
    """Set `rng` to a state saved by `get_state()`, wherever the file was loaded to; True.

    A state of another kind of random stream (a CUDA Philox state is 16 bytes, a CPU Mersenne Twister one 5056: a
    checkpoint written on a GPU and continued on a CPU, or the reverse) cannot be set: the stream is then
    seeded from a digest of the saved state, deterministic and distinct per stream and position, but not the
    stream the other device would have drawn; False.
    """
    state = state.cpu()   # a checkpoint loaded with map_location=<cuda device> holds it on the GPU
    if state.numel() == rng.get_state().numel():
        rng.set_state(state)
        return True
    digest = hashlib.sha256(state.contiguous().numpy().tobytes()).digest()
    rng.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    log.warning("a %d-byte random-stream state cannot continue on %s (another kind of generator): reseeded from it",
                state.numel(), rng.device)
    return False
