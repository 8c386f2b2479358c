"""Where and how precisely a run computes: the device (`--device`), `--precision` and `--compile`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from tune_bir.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cuda[:N]` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={name} but no CUDA device is available here; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device={name} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                          f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """bf16 autocast needs a CUDA device that supports it (the CPU always does, natively or emulated)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision=bf16 but {torch.cuda.get_device_name(device)} has no bfloat16 support")


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    """torch's float32 matmul precision ("highest" | "high" = TF32 | "medium") inside the block, restored after:
    `--precision tf32` must not leak into evaluation or into other code of the process."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def tf32_matmuls(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """`--precision tf32`: float32 matrix products on a CUDA device's TF32 units inside the block; elsewhere (and
    on the CPU, which has no TF32 units) nothing changes."""
    if precision == "tf32" and device.type == "cuda":
        return float32_matmul_precision("high")
    return contextlib.nullcontext()


def compiled(fn: Callable, mode: str) -> Callable:
    """`fn` itself (`--compile off`), or torch.compile of it in that mode (reduce-overhead: CUDA graphs on a GPU)."""
    if mode == "off":
        return fn
    key_compile_caches_by_cpu_isa()
    # a plugin with an objective of its own may back-propagate through the compiled pass a second time (the
    # contrastive objective where its rows cannot have a graph of their own): the first backward keeps the graph,
    # which a backward that donates its saved buffers refuses. Process-wide, because a patch around the compiled
    # call is not enough: torch 2.14 reads the flag again when the backward runs, outside that call, and refuses a
    # retained graph of a pass compiled without donation (tried: test_contrastive_replay_trains_under_compile's four
    # cases all fail so). What it costs is memory: the backward no longer reuses saved buffers for its outputs.
    torch._functorch.config.donated_buffer = False
    return torch.compile(fn, mode=mode)


CPU_ISA_TAG = "cpu_vec_isa="


def key_compile_caches_by_cpu_isa() -> str:
    """Put the CPU vector instruction set inductor writes C++ for into torch.compile's cache keys; returns the tag.

    Inductor picks that set per process (the CPU's widest, or ATEN_CPU_CAPABILITY's) and writes its vector width
    into the code it generates, but torch 2.14 keys its on-disk FX-graph and AOTAutograd caches (TORCHINDUCTOR_
    CACHE_DIR, default /tmp/torchinductor_$USER) without it: a later process with another set (a run under
    ATEN_CPU_CAPABILITY=avx2, or another CPU kind sharing the folder) loads the code for the other width and
    builds it for its own, which computes wrong numbers or corrupts the heap (measured on an AMD EPYC, Zen 5:
    NaN losses in the compiled VAE pass under the avx2 caps after a native run; a compiled Linear+ReLU 0.48 off,
    then "double free or corruption", natively after an avx2 run). `torch.compiler.config.cache_key_tag` is
    torch's own switch for splitting those caches; a tag the user set stays. Process-wide on purpose: the
    backward pass compiles later, inside `backward()`, under the same key rules.
    """
    # inductor's own choice, the one its code generation makes
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    tag = f"{CPU_ISA_TAG}{str(isa).replace(' ', '+') if isa else 'none'}"
    others = [t for t in torch.compiler.config.cache_key_tag.split(";") if t and not t.startswith(CPU_ISA_TAG)]
    torch.compiler.config.cache_key_tag = ";".join([*others, tag])
    return tag
