"""Provenance of a run or sweep: package versions, git commit, device, and the CPU that computed it."""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

PACKAGES = ("tune_bir", "torch", "torchvision", "kornia", "torchmetrics", "ray", "optuna", "mlflow", "numpy")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(path: str | Path | None = None) -> str | None:
    """Commit of the checkout holding this package, with "-dirty" when tracked files differ from it (the run's
    code is then not that commit's); None for an installed wheel or without git."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        changed = subprocess.run(["git", "-C", str(where), "diff", "--quiet", "HEAD", "--"], capture_output=True,
                                 timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if changed.returncode == 1 else "")


# Per-seed numbers are bit-identical only on the same kind of CPU with the same thread count: the SIMD width
# torch's kernels, MKL's GEMMs and oneDNN's convolutions dispatch to decides how sums are rounded, and the
# thread count decides how a reduction is split (docs/results.md "Which numbers reproduce where").
FINGERPRINT_FIELDS = ("cpu_model", "cpu_isa_torch", "cpu_isa_mkl", "mkl_cbwr", "cpu_isa_onednn", "threads",
                      "torch_version", "mkl_version", "onednn_version")


def cpu_fingerprint(threads: int | None = None) -> dict[str, Any]:
    """Where a run's numbers reproduce bit for bit: CPU model, the instruction set torch, MKL and oneDNN use,
    MKL's reproducibility mode, the thread count (`threads`, else torch's current one) and library versions.
    Flat string/int values (None where unknown), keys FINGERPRINT_FIELDS."""
    import torch

    found = {"cpu_model": cpu_model(), "cpu_isa_torch": torch.backends.cpu.get_cpu_capability(),
             **_library_isas(), "threads": int(threads) if threads else torch.get_num_threads(),
             "torch_version": torch.__version__}
    return {name: found[name] for name in FINGERPRINT_FIELDS}


# A Tune trial reports its fingerprint with every result under this prefix (`cpu/cpu_model`, ...; MLflow params
# of the same names); results.csv rows carry the bare FINGERPRINT_FIELDS
CPU_PREFIX = "cpu/"


def result_fingerprint(result: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint in a trial's result (CPU_PREFIX keys) under the bare FINGERPRINT_FIELDS names; None for
    a field the result lacks (a sweep from before results carried it)."""
    return {name: result.get(CPU_PREFIX + name) for name in FINGERPRINT_FIELDS}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@functools.cache
def _library_isas() -> dict[str, str | None]:
    """What MKL and oneDNN dispatch to in this process (fixed at their first call: MKL_ENABLE_INSTRUCTIONS,
    MKL_CBWR, ONEDNN_MAX_CPU_ISA are read then), from their own verbose banners: neither library has another
    query that torch's static build exports. One tiny GEMM and one tiny convolution, no random numbers drawn."""
    import torch

    out: dict[str, str | None] = {"cpu_isa_mkl": None, "mkl_cbwr": None, "cpu_isa_onednn": None,
                                  "mkl_version": None, "onednn_version": None}
    config = torch.__config__.show()
    if match := re.search(r"Math Kernel Library Version ([\d.]+)", config):
        out["mkl_version"] = match.group(1)
    if match := re.search(r"MKL-DNN v(\S+)", config):
        out["onednn_version"] = match.group(1)
    if torch.backends.mkl.is_available() and (mkl_verbose := _torch_symbol("MKL_Verbose")):
        ones = torch.ones(8, 8)
        mkl_verbose.restype = ctypes.c_int
        text = _c_stdout(lambda: (mkl_verbose(1), ones @ ones, mkl_verbose(int(bool(os.environ.get("MKL_VERBOSE"))))))
        # "... for Intel(R) 64 architecture <processors>, Lnx ..." names the code path MKL took, e.g. "Intel(R)
        # Advanced Vector Extensions 2 (Intel(R) AVX2) enabled processors", or "Intel(R) Architecture
        # processors", its one path on a CPU it does not tune for (AMD); the call line says the reproducibility
        # (CNR) mode in force
        if match := re.search(r"64 architecture (.+?), Lnx", text):
            out["cpu_isa_mkl"] = match.group(1)
        if match := re.search(r"CNR:(\S+)", text):
            out["mkl_cbwr"] = match.group(1)
    if torch.backends.mkldnn.is_available():
        image, kernel = torch.ones(1, 1, 4, 4), torch.ones(1, 1, 2, 2)

        def convolve() -> None:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                torch.mkldnn_convolution(image, kernel, None, [0, 0], [1, 1], [1, 1], 1)

        if match := re.search(r"info,cpu,isa:(.+)", _c_stdout(convolve)):
            out["cpu_isa_onednn"] = match.group(1).strip()
    return out


def _torch_symbol(name: str) -> Any:
    """A C function exported by torch's CPU library (MKL is linked into it statically), or None."""
    import torch

    library = Path(torch.__file__).parent / "lib" / ("libtorch_cpu" + (".dylib" if sys.platform == "darwin"
                                                                        else ".so"))
    try:
        return getattr(ctypes.CDLL(str(library)), name)
    except (OSError, AttributeError):
        return None


def _c_stdout(action: Callable[[], Any]) -> str:
    """What C code writes to file descriptor 1 while `action` runs (the libraries' banners), kept off the
    caller's output."""
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            try:
                action()
            except RuntimeError:   # a library built without verbose support: nothing to read
                pass
            libc.fflush(None)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        sink.seek(0)
        return sink.read().decode(errors="replace")
