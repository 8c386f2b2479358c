"""Training throughput of N engine processes sharing one device (docs/architecture.md "GPU").

For each N in `--processes` (default 1, 2, 4, 8: what `--gpus-per-trial 1, 0.5, 0.25, 0.125` places on one
GPU), N worker processes each build a BI-R+SI engine on the device (CIFAR-100-shaped generated data through
random frozen conv layers, or the offline splitMNIST5k), train one warm-up segment, wait until all N are
ready, then train segments (`--iters` iterations per task, one segment per task as a sweep's Tune step, each
ending with evaluation; a fresh engine after the last task) for `--seconds`. Total throughput is the sum over
workers of segments finished / time they took, per hour; the best N is printed with the `--gpus-per-trial`
that places it. `--out FILE` writes the table as JSON.

  python benchmarks/gpu_sharing.py --device cuda [--processes 1,2,4,8] [--seconds 60] [--out FILE]
  python benchmarks/gpu_sharing.py --device cpu --processes 1,2 --experiment splitMNIST5k --iters 3 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One engine process: build, warm up, report ready, wait for the start signal, train segments, report."""
    import torch

    from tune_bir.config import BIRConfig
    from tune_bir.engine import Engine

    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    flags = dict(replay="generative", brain_inspired=True, si=True, iters=args.iters, device=args.device,
                 seed=args.index, precision=args.precision)
    if args.experiment == "CIFAR100":
        from benchmarks.engine_speed import synthetic_cifar

        protocol = synthetic_cifar()
        config = BIRConfig(experiment="CIFAR100", c=1e8, dg_prop=0.6, pretrained_conv=str(folder / "conv.pt"),
                           **flags)
        make = lambda: Engine(config, protocol=protocol)  # noqa: E731
    else:
        config = BIRConfig(experiment="splitMNIST5k", c=0.1, **flags)
        make = lambda: Engine(config)  # noqa: E731
    engine = make()
    engine.train_segment(None)            # warm-up: allocations, kernels, and the task-1 shapes
    (folder / f"ready-{args.index}").touch()
    while not (folder / "go").exists():
        time.sleep(0.01)
    segments, iterations, start = 0, 0, time.perf_counter()
    deadline = start + args.seconds
    end = start
    while time.perf_counter() < deadline:
        if engine.done:
            engine = make()
        engine.train_segment(None)        # one task, with its evaluation: a sweep's Tune step
        end = time.perf_counter()
        segments += 1
        iterations += args.iters
    (folder / f"result-{args.index}.json").write_text(json.dumps(
        {"segments": segments, "iterations": iterations, "seconds": end - start}))


def run_together(n: int, args: argparse.Namespace, conv_path: Path | None) -> dict:
    """Start n workers, release them together once all are ready, and collect their results."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if conv_path is not None:
            (folder / "conv.pt").symlink_to(conv_path)
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, __file__, "--worker", "--folder", str(folder), "--device", args.device,
                   "--experiment", args.experiment, "--iters", str(args.iters), "--seconds", str(args.seconds),
                   "--threads", str(args.threads), "--precision", args.precision]
        workers = [subprocess.Popen([*command, "--index", str(i)], env=env, cwd=ROOT) for i in range(n)]
        try:
            while sum(1 for i in range(n) if (folder / f"ready-{i}").exists()) < n:
                failed = [w.returncode for w in workers if w.poll() not in (None, 0)]
                if failed:
                    raise SystemExit(f"a worker of {n} failed before it was ready (exit code {failed[0]})")
                time.sleep(0.05)
            (folder / "go").touch()
            codes = [w.wait(timeout=args.seconds * 10 + 600) for w in workers]
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
        if any(codes):
            raise SystemExit(f"workers of {n} exited with {codes}")
        results = [json.loads((folder / f"result-{i}.json").read_text()) for i in range(n)]
    per_hour = [3600 * r["segments"] / r["seconds"] for r in results if r["seconds"] > 0]
    return {"processes": n, "gpus_per_trial": 1 / n, "segments_per_hour": sum(per_hour),
            "segments_per_hour_per_process": per_hour, "workers": results}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--processes", default="1,2,4,8", help="comma-separated numbers of processes at once")
    parser.add_argument("--experiment", default="CIFAR100", choices=("CIFAR100", "splitMNIST5k"))
    parser.add_argument("--iters", type=int, default=200, help="iterations per task (one segment)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured time per N, after warm-up")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each worker (a Ray trial's 1 CPU)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    counts = [int(n) for n in args.processes.split(",") if n.strip()]
    if not counts or min(counts) < 1:
        raise SystemExit(f"--processes takes positive numbers, got {args.processes!r}")
    import torch

    from tune_bir.nets import ConvLayers

    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    print(f"{args.experiment} BI-R+SI {args.precision}, {args.iters} iterations per segment, {args.seconds:g} s per N "
          f"on {name} (torch {torch.__version__})")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        conv_path = None
        if args.experiment == "CIFAR100":
            conv_path = Path(tmp) / "conv.pt"
            torch.save({"state": ConvLayers().state_dict()}, conv_path)
        for n in counts:
            row = run_together(n, args, conv_path)
            rows.append(row)
            print(f"  {n} process(es) (--gpus-per-trial {1 / n:g}): {row['segments_per_hour']:9.1f} segments/hour "
                  f"in all, {row['segments_per_hour'] / n:8.1f} each", flush=True)
    best = max(rows, key=lambda r: r["segments_per_hour"])
    base = rows[0]["segments_per_hour"]
    print(f"{'processes':>9} {'gpus/trial':>10} {'segments/h':>11} {'x of ' + str(rows[0]['processes']):>8}")
    for row in rows:
        print(f"{row['processes']:>9} {row['gpus_per_trial']:>10.3g} {row['segments_per_hour']:>11.1f} "
              f"{row['segments_per_hour'] / base:>8.2f}")
    print(f"best: {best['processes']} process(es) at once, --gpus-per-trial {best['gpus_per_trial']:g}")
    result = {"device": name, "torch": torch.__version__, "experiment": args.experiment, "precision": args.precision,
              "iters_per_segment": args.iters, "seconds": args.seconds, "threads_per_process": args.threads,
              "rows": rows, "best_processes": best["processes"], "best_gpus_per_trial": best["gpus_per_trial"]}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
