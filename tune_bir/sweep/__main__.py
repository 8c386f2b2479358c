"""`python -m tune_bir.sweep`: see tune_bir/sweep/driver.py; chosen and sequential confirmations are confirmation's.

This module is the command line's composition root, the one module of tune_bir.sweep in the layer above the
analysis (docs/architecture.md "Layers"): it dispatches a chosen or sequential `--confirm` to `confirmation`,
and runs `--then-confirm` (sweep, then a pre-registered sequential confirmation of its best config, then the
report of `python -m analysis`).
"""

from __future__ import annotations

import sys

from tune_bir.cli import run_main
from tune_bir.errors import ConfigError
from tune_bir.sweep import driver
from tune_bir.sweep.plan import PROG, THEN_CONFIRM_OPTIONS, SweepOptions, build_parser, given_options


def main(argv: list[str] | None = None) -> int:
    """A sweep or top-K --confirm (driver.main), a chosen/sequential confirmation, or --then-confirm."""
    from confirmation.cli import is_chosen_confirmation

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.then_confirm:
        return then_confirm(argv)
    if is_chosen_confirmation(args):
        import confirmation

        return confirmation.main(argv)
    return driver.main(argv)


def then_confirm(argv: list[str]) -> int:
    """Sweep, then pre-register the sweep's best config against its baseline, confirm it sequentially on fresh
    seeds under the sweep's MLflow parent run, and write the report; every option is checked before the sweep."""
    import analysis.__main__ as analysis_cli
    import confirmation
    from confirmation.plan import check_design_options
    from tune_bir.sweep.summary import print_summary

    args = build_parser().parse_args(argv)
    options = SweepOptions.from_namespace(args)
    if options.confirm:
        raise ConfigError("--then-confirm confirms the sweep this command runs; --confirm SWEEP confirms a finished "
                          "one: drop one of them")
    if options.resume:
        raise ConfigError("--then-confirm starts a new sweep; to finish an interrupted one, --resume it, then "
                          f"{PROG} --confirm SWEEP --configs top1 --sequential --margin D")
    if options.num_samples < 2:
        raise ConfigError(f"--then-confirm needs --num-samples >= 2: the first trial is the baseline, so a sweep of "
                          f"{options.num_samples} has no config to confirm")
    if options.margin is None:
        raise ConfigError("--then-confirm needs --margin D, the equivalence margin of its sequential confirmation, "
                          "in units of acc_avg (e.g. 0.005)")
    check_design_options(options.alpha, options.margin, options.max_seeds, options.looks)
    outcome = driver.run_sweep(argv)
    print_summary(outcome)
    if outcome.interrupted:
        return 130
    given = given_options(argv)
    confirm_argv = ["--confirm", outcome.plan.folder.location, "--configs", "top1", "--sequential"]
    for name in THEN_CONFIRM_OPTIONS:
        if name in given:
            confirm_argv += [f"--{name.replace('_', '-')}", str(getattr(options, name))]
    for name in ("max_concurrent", "address", "num_cpus"):
        if name in given:
            confirm_argv += [f"--{name.replace('_', '-')}", str(getattr(options, name))]
    if options.dashboard:
        confirm_argv.append("--dashboard")
    print(f"\nconfirming the sweep's best config: {PROG} {' '.join(confirm_argv)}")
    code = confirmation.main(confirm_argv)
    if code != 0:
        return code
    return analysis_cli.main([f"{outcome.plan.folder.location}/confirm"])


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
