"""Golden runs: short deterministic engine runs whose every metric is pinned in tests/data/golden_metrics.json.

A refactor of the engine, the exaggeration terms or the config must leave these numbers as they are. With
TUNE_BIR_GOLDEN_EXACT=1 the comparison is exact (every float, and a hash of the final weights): use it on the
machine that wrote the file, before and after a refactor. Otherwise it allows rtol=1e-5, atol=1e-7: another
CPU (other SIMD width, other BLAS kernels) rounds the last bits of sums differently, and 150 training steps
carry such differences into the metrics.

Regenerate the file (only when a change of results is intended, and say so in the commit):
    .venv/bin/python -m tests.test_golden --write
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tune_bir.config import BIRConfig
from tune_bir.engine import Engine

GOLDEN_FILE = Path(__file__).resolve().parent / "data" / "golden_metrics.json"
EXACT = os.environ.get("TUNE_BIR_GOLDEN_EXACT") == "1"

BASE: dict[str, Any] = dict(experiment="splitMNIST5k", scenario="class", tasks=5, iters=30, batch=32,
                            val_fraction=0.1, seed=3, device="cpu", fc_units=100)
BIR_SI: dict[str, Any] = dict(replay="generative", brain_inspired=True, si=True, c=0.1)
RUNS: dict[str, dict[str, Any]] = {
    "bir_si": BIR_SI,
    "repulsion_js": BIR_SI | dict(repulsion=True, lamda_rep=10.0, kl_js="js"),
    "repulsion_rep_f": BIR_SI | dict(repulsion=True, lamda_rep=10.0, kl_js="js", use_rep_f=True, rep_f=3.0,
                                     n_rep=2, rep_target="sample"),
    "recon": BIR_SI | dict(recon_repulsion=True, lamda_recon_rep=1.0, recon_attraction=True,
                           lamda_recon_atr=0.5, recon_rep_aver=True),
    "contrastive_separate": BIR_SI | dict(contrastive=True, c_lr=1e-3, lamda_contr=1.0),
    "contrastive_reference": BIR_SI | dict(contrastive=True, c_lr=1e-3, lamda_contr=1.0, c_scores=True,
                                           contr_grad_mode="reference"),
    "not_hidden": BIR_SI | dict(not_hidden=True),
    "generative_separate_generator": dict(replay="generative", si=True, c=0.1),
    "lwf": dict(replay="current"),
}


def run(overrides: dict[str, Any]) -> dict[str, Any]:
    """Train every task of one config; every segment's metrics (minus wall time) and a hash of the weights."""
    torch.manual_seed(12345)   # the engine seeds it itself; this only shows that it does
    engine = Engine(BIRConfig(**(BASE | overrides)))
    segments = []
    while not engine.done:
        metrics = engine.train_task()
        segments.append({k: v for k, v in metrics.items() if k != "time_this_step_s"})
    digest = hashlib.sha256()
    for name, tensor in engine.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {"segments": segments, "model_sha256": digest.hexdigest()}


def _close(a: float, b: float) -> bool:
    if EXACT:
        return a == b or (math.isnan(a) and math.isnan(b))
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7) or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("name", list(RUNS))
def test_golden_run_reproduces_its_pinned_metrics(name):
    golden = json.loads(GOLDEN_FILE.read_text())
    expected = golden["runs"][name]
    assert expected["config"] == BASE | RUNS[name], "the pinned config changed: regenerate deliberately"
    got = run(RUNS[name])
    assert len(got["segments"]) == len(expected["segments"])
    for t, (seg, ref) in enumerate(zip(got["segments"], expected["segments"], strict=True), start=1):
        assert sorted(seg) == sorted(ref), f"task {t}: metric names differ"
        bad = {k: (seg[k], ref[k]) for k in ref if not _close(seg[k], ref[k])}
        assert not bad, f"task {t}: {bad}"
    if EXACT:
        assert got["model_sha256"] == expected["model_sha256"]


def write() -> None:
    torch.set_num_threads(2)
    runs = {name: {"config": BASE | overrides, **run(overrides)} for name, overrides in RUNS.items()}
    GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN_FILE.write_text(json.dumps({"torch": torch.__version__, "runs": runs}, indent=1) + "\n")
    print(f"wrote {GOLDEN_FILE}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_golden --write")
    write()
