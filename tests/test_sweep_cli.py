"""`python -m tune_bir.sweep` before Ray starts: defaults, validation, one-line errors with exit code 2."""

import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tune_bir.cli import run_main
from tune_bir.config import BIRConfig
from tune_bir.sweep.driver import main
from tune_bir.sweep.plan import PROG, build_parser, plan_from_args
from tune_bir.sweep.storage import SweepFolder
from tune_bir.sweep.summary import best_values, train_command
from tune_bir.train import config_from_args


def plan(*argv: str, tmp_path: Path):
    return plan_from_args(build_parser().parse_args([*argv, "--storage-path", str(tmp_path)]))


def test_no_arguments_plan_the_embedded_splitmnist5k_repulsion_sweep(tmp_path):
    p = plan(tmp_path=tmp_path)
    cfg = p.resolved
    assert (cfg.experiment, cfg.iters, cfg.val_fraction) == ("splitMNIST5k", 150, 0.1)
    assert cfg.brain_inspired and cfg.si and cfg.replay == "generative"
    assert p.space.name == "repulsion"
    assert (p.options.num_samples, p.options.max_concurrent, p.options.cpus_per_trial) == (6, 2, 1.0)
    assert (p.max_t, p.grace_t) == (5, 2)
    assert p.folder.root == str(tmp_path) and p.folder.name.startswith("repulsion-splitMNIST5k-")


def test_asha_budget_is_counted_in_segments(tmp_path):
    p = plan("--iters", "100", "--segment-iters", "30", "--grace-period", "3", tmp_path=tmp_path)
    assert (p.segments_per_task, p.max_t, p.grace_t) == (4, 20, 12)


def test_base_flags_are_the_train_flags_and_paths_are_made_absolute(tmp_path):
    p = plan("--experiment", "splitMNIST", "--lr", "0.5", "--data-dir", "rel/data", "--no-si", tmp_path=tmp_path)
    assert p.base_config["lr"] == 0.5 and p.base_config["si"] is False
    assert "iters" not in p.base_config                 # a named experiment keeps its own iterations
    assert p.trial_base["data_dir"].startswith("/") and p.trial_base["data_dir"].endswith("rel/data")


@pytest.mark.parametrize("argv, message", [
    (["--space", "bogus"], "unknown search space 'bogus'"),
    (["--lamda-rep", "5"], "sets lamda_rep itself"),
    (["--lamda-rep", "-1"], "--lamda-rep must be >= 0"),
    (["--c", "-1"], "--c must be >= 0"),
    (["--val-fraction", "0"], "--val-fraction must be > 0"),
    (["--grace-period", "9"], "--grace-period must be 1..5 tasks"),
    (["--reduction-factor", "1"], "--reduction-factor must be > 1"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--seeds-per-trial", "0"], "--seeds-per-trial must be >= 1"),
    (["--no-brain-inspired"], "acts on replayed memories"),
    (["--kl-js", "jsd"], "argument --kl-js: invalid choice"),
])
def test_bad_input_is_one_line_and_exit_code_2_before_ray_starts(tmp_path, capsys, argv, message):
    try:
        code = run_main(PROG, main, [*argv, "--storage-path", str(tmp_path / "rr")])
    except SystemExit as exit_:   # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "rr").exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_bad_user_space_files_fail_fast_on_the_real_command_line(tmp_path):
    cases = {"broken.yaml": "params: [oops", "unknown.yaml": "params:\n  lamda_repp: {loguniform: [1, 2]}\n",
             "empty.yaml": "fixed: {repulsion: true}\nparams:\n  lamda_rep: {loguniform: [5, 5]}\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "tune_bir.sweep", "--space", str(tmp_path / name)],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith(f"{PROG}: error: search space ") and out.stderr.count("\n") == 1
        assert time.perf_counter() - start < 30 and not (tmp_path / "ray_results").exists()


def test_existing_sweep_folder_needs_resume(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "sweep.json").write_text("{}")
    assert run_main(PROG, main, ["--name", "taken", "--storage-path", str(tmp_path)]) == 2
    assert "add --resume" in capsys.readouterr().err
    assert run_main(PROG, main, ["--resume", "--name", "nope", "--storage-path", str(tmp_path)]) == 2
    assert "no sweep to resume" in capsys.readouterr().err


def test_best_config_becomes_a_runnable_train_line_and_json(tmp_path):
    p = plan("--iters", "40", tmp_path=tmp_path)
    row = {"baseline": False, "repulsion": True, "lamda_rep": 123.456789012345, "kl_js": "kl",
           "use_rep_f": True, "rep_f": 6.5, "n_rep": 2}
    values = best_values(p, row)
    line = train_command(values)
    assert line.startswith("python -m tune_bir.train ") and "--lamda-rep=123.456789012345" in line
    from_line = config_from_args(shlex.split(line)[3:])
    assert from_line == BIRConfig.from_dict(values).resolved()
    assert from_line.repulsion and from_line.rep_f == 6.5 and from_line.iters == 40
    baseline = best_values(p, {"baseline": True})
    assert not BIRConfig.from_dict(baseline).resolved().uses_exaggeration


def test_sweep_folder_works_on_storage_uris_as_on_local_paths(tmp_path):
    folder = SweepFolder.at(f"file://{tmp_path}/store/", "a")   # what s3:// or gs:// go through (pyarrow)
    assert folder.location == f"file://{tmp_path}/store/a" and not folder.exists("sweep.json")
    folder.write_text("sweep.json", "{}")
    assert folder.exists("sweep.json") and folder.read_text("sweep.json") == "{}"
    assert (tmp_path / "store" / "a" / "sweep.json").read_text() == "{}"
    time.sleep(0.05)
    SweepFolder.at(f"file://{tmp_path}/store", "b").write_text("sweep.json", "{}")
    (tmp_path / "store" / "not-a-sweep").mkdir()
    assert SweepFolder.at(f"file://{tmp_path}/store", "-").latest_sibling().name == "b"
    assert SweepFolder.at(str(tmp_path / "store"), "-").latest_sibling().location == str(tmp_path / "store" / "b")


def test_a_resumed_sweep_takes_its_own_settings_again_and_refuses_others(tmp_path):
    from tune_bir.errors import ConfigError
    from tune_bir.sweep.plan import check_resume_options, given_options

    p = plan("--iters", "40", "--name", "s", tmp_path=tmp_path)
    same = ["--resume", "--name", "s", "--iters", "40", "--space", "repulsion", "--num-cpus", "2"]
    check_resume_options(build_parser().parse_args(same), given_options(same), p)   # the same command again
    for flags, message in ((["--iters", "41"], "--iters 41 contradicts sweep s's own --iters 40"),
                           (["--space", "recon"], "--space recon contradicts"),
                           (["--num-samples", "9"], "--num-samples 9 contradicts sweep s's own --num-samples 6")):
        argv = ["--resume", "--name", "s", *flags]
        with pytest.raises(ConfigError, match=message):
            check_resume_options(build_parser().parse_args(argv), given_options(argv), p)


def test_the_baseline_line_leaves_out_the_options_of_terms_it_has_off(tmp_path):
    # a base option of the searched term (--d-min) acts in every trial but the baseline; the baseline's printed
    # train line must not carry it (train refuses a term option without its term)
    p = plan("--iters", "40", "--d-min", "0.01", tmp_path=tmp_path)
    baseline = best_values(p, {"baseline": True})
    assert "d_min" not in baseline and not baseline.get("repulsion")
    assert config_from_args(shlex.split(train_command(baseline))[3:]) == BIRConfig.from_dict(baseline).resolved()
    searched = best_values(p, {"baseline": False, "repulsion": True, "lamda_rep": 5.0})
    assert searched["d_min"] == 0.01
    config_from_args(shlex.split(train_command(searched))[3:])
