"""Pre-registered, sequential confirmations (confirmation/): plan before runs, seed ledger, look after look, resume."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from analysis.sequential import DECIDED, GO_ON, VERDICTS
from confirmation.cli import Where, locate, new_plan
from confirmation.ledger import LEDGER_FILE, Ledger, seeds_of_sweep
from tune_bir.config import label_permutation
from tune_bir.errors import ConfigError
from tune_bir.sweep.__main__ import main
from tune_bir.sweep.plan import SweepOptions, build_parser

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--iters", "8", "--batch", "32"]
CONFIGS = [{"label": "rep", "values": {"repulsion": True, "lamda_rep": 10.0, "kl_js": "kl", "n_rep": 3},
            "source": "a test"}]


def _plan_of(argv: list[str]):
    args = build_parser().parse_args(argv)
    options = SweepOptions.from_namespace(args)
    return new_plan(args, options, locate(options), argv)


def test_every_seed_of_the_sources_sweeps_counts_as_used():
    used = seeds_of_sweep(str(ROOT / "docs/results/repulsion/sweep.json"))
    assert sorted(used) == list(range(0, 9))    # the sweep trained seed 0, its confirmation seeds 1-8
    assert used[0] == "sweep first-answer-repulsion" and "confirmation" in used[5]


def test_the_item_7_configs_are_those_of_their_sources_on_equal_base_configs(tmp_path):
    configs = ROOT / "docs/results/sequential/configs.json"
    argv = ["--confirm", str(tmp_path / "c"), "--config-file", str(configs), "--iters", "500", "--sequential",
            "--max-seeds", "48", "--looks", "6", "--margin", "0.005"]
    plan = _plan_of(argv)
    assert plan.seeds == list(range(9, 57))   # the first seeds after those of both sweeps and their pilots
    assert plan.design["looks"] == [8, 16, 24, 32, 40, 48] and plan.design["n_configs"] == 2
    assert plan.to_json()["resolved_base_config"]["c"] == 0.1
    changed = json.loads(configs.read_text())
    for c in changed:
        c["source"] = {k: (str(configs.parent / v) if k in ("sweep", "confirmation") else v)
                       for k, v in c["source"].items()}
    changed[1]["values"]["c_temp"] = 0.09
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    with pytest.raises(ConfigError, match="contrastive-top2's values are not those of top2"):
        _plan_of([*argv[:3], str(tmp_path / "changed.json"), *argv[4:]])
    with pytest.raises(ConfigError, match="base config .* is not this confirmation's"):
        _plan_of([*argv[:5], "400", *argv[6:]])


@pytest.fixture(scope="module")
def sequential(ray_session, tmp_path_factory):
    """A tiny sequential confirmation (one config, looks at 2 and 4 seeds), run to its end."""
    tmp = tmp_path_factory.mktemp("sequential")
    (tmp / "configs.json").write_text(json.dumps(CONFIGS))
    folder = tmp / "runs" / "c"
    argv = ["--confirm", str(folder), "--config-file", str(tmp / "configs.json"), *TINY, "--first-seed", "100",
            "--sequential", "--max-seeds", "4", "--looks", "2", "--margin", "0.005",
            "--mlflow-uri", f"sqlite:///{tmp / 'm.db'}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return SimpleNamespace(tmp=tmp, folder=folder, argv=argv, code=code, stdout=out.getvalue())


def _rows(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((folder / "results.csv").open()))


@pytest.mark.slow
def test_a_sequential_confirmation_registers_its_plan_before_it_runs_and_decides_look_by_look(sequential):
    s = sequential
    assert s.code == 0, s.stdout
    text = (s.folder / "plan.json").read_bytes()
    sha = hashlib.sha256(text).hexdigest()
    assert f"sha256 {sha}" in s.stdout
    entry = Ledger.at(str(s.folder.parent)).entry(str(s.folder))
    assert entry["plan_sha256"] == sha and entry["seeds"] == [100, 101, 102, 103]
    state = json.loads((s.folder / "state.json").read_text())
    parent = MlflowClient(state["mlflow"]["tracking_uri"]).get_run(state["mlflow"]["parent_run_id"])
    assert parent.data.tags["tune_bir.plan_sha256"] == sha
    plan = json.loads(text)
    assert plan["seeds"] == [100, 101, 102, 103] and plan["design"]["looks"] == [2, 4]
    assert plan["configs"] == CONFIGS and plan["base_config"]["iters"] == 8
    # written before the first run: older than every trial folder
    trial_dirs = [p for p in s.folder.glob("look-*/BIRTrainable_*") if p.is_dir()]
    assert trial_dirs and (s.folder / "plan.json").stat().st_mtime <= min(p.stat().st_mtime for p in trial_dirs)
    looks = json.loads((s.folder / "looks.json").read_text())
    verdicts = [look["verdicts"][0] for look in looks]
    assert all(v["verdict"] in VERDICTS and v["config"] == "rep" for v in verdicts)
    assert all(look["commit"] for look in looks) and [look["n"] for look in looks] == [2, 4][:len(looks)]
    # a decided config stops; one still going on at the last look is undecided there
    assert all(v["verdict"] == GO_ON for v in verdicts[:-1])
    assert verdicts[-1]["verdict"] in DECIDED or (len(looks) == 2 and verdicts[-1]["verdict"] == "undecided")
    rows = _rows(s.folder)
    seeds = plan["seeds"][:looks[-1]["n"]]
    assert sorted((r["config"], int(r["seed"])) for r in rows) == sorted((c, x) for c in ("baseline", "rep")
                                                                         for x in seeds)
    for r in rows:
        assert r["status"] == "completed" and r["cpu_model"] and r["cpu_isa_torch"]
        assert r["class_order"] == " ".join(str(c) for c in label_permutation("splitMNIST5k", int(r["seed"])))
        assert int(r["look"]) == (1 if int(r["seed"]) in (100, 101) else 2)
    children = MlflowClient(state["mlflow"]["tracking_uri"]).search_runs(
        [state["mlflow"]["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted((r.data.tags["confirm_config"], int(r.data.tags["confirm_seed"])) for r in children) == sorted(
        (r["config"], int(r["seed"])) for r in rows)


@pytest.mark.slow
def test_resume_continues_only_that_plan_and_runs_nothing_again(sequential):
    s = sequential
    before = (s.folder / "results.csv").read_text()
    with pytest.raises(ConfigError, match="add --resume"):
        main(s.argv)
    with pytest.raises(ConfigError, match="--iters does not apply here"):
        main(["--confirm", str(s.folder), "--resume", "--iters", "9"])
    assert main(["--confirm", str(s.folder), "--resume"]) == 0
    assert (s.folder / "results.csv").read_text() == before
    # a copy whose plan.json was edited is refused, in one line, before Ray or MLflow
    copy = s.tmp / "copy"
    shutil.copytree(s.folder, copy, ignore=shutil.ignore_patterns("look-*"))
    (copy / "plan.json").write_text((copy / "plan.json").read_text().replace('"margin": 0.005', '"margin": 0.01'))
    with pytest.raises(ConfigError, match="no longer matches its registered sha256"):
        main(["--confirm", str(copy), "--resume"])


@pytest.mark.slow
def test_the_ledger_refuses_seeds_another_confirmation_used(sequential):
    s = sequential
    argv = ["--confirm", str(s.folder.parent / "c2"), "--config-file", str(s.tmp / "configs.json"), *TINY,
            "--sequential", "--max-seeds", "4", "--looks", "2", "--margin", "0.005"]
    with pytest.raises(ConfigError, match=r"seeds already used: 102 \(confirmation c .*--first-seed 104"):
        _plan_of([*argv, "--first-seed", "102"])
    assert _plan_of(argv).seeds == [104, 105, 106, 107]   # the default: after every seed the ledger knows
    reused = _plan_of([*argv, "--first-seed", "102", "--reuse-seeds"])
    assert reused.reuse_seeds == [102, 103] and reused.to_json()["reuse_seeds"] == [102, 103]
    assert not (s.folder.parent / "c2").exists() and json.loads(
        (s.folder.parent / LEDGER_FILE).read_text())["entries"][0]["folder"] == str(s.folder)


def test_where_a_confirmation_lives(tmp_path):
    options = SweepOptions(confirm=str(tmp_path / "mine"))
    where = locate(options)
    assert isinstance(where, Where) and where.sweep is None and where.label == "mine"
    assert where.folder.location == str(tmp_path / "mine") and where.ledger.root.location == str(tmp_path)


@pytest.mark.slow
def test_then_confirm_sweeps_then_confirms_the_best_config_on_fresh_seeds_and_reports(ray_session, tmp_path):
    store, uri = tmp_path / "rr", f"sqlite:///{tmp_path / 'm.db'}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*TINY, "--seed", "0", "--num-samples", "2", "--grace-period", "5", "--name", "s",
                     "--storage-path", str(store), "--mlflow-uri", uri, "--then-confirm", "--max-seeds", "4",
                     "--looks", "1", "--margin", "0.005"])
    assert code == 0, out.getvalue()
    sweep = json.loads((store / "s" / "sweep.json").read_text())
    folder = store / "s" / "confirm"
    plan = json.loads((folder / "plan.json").read_text())
    best = next(r for r in csv.DictReader((store / "s" / "results.csv").open()) if r["baseline"] == "False")
    assert [c["label"] for c in plan["configs"]] == ["top1"] and plan["configs"][0]["source"]["trial_id"] == \
        best["trial_id"]
    assert plan["seeds"] == [1, 2, 3, 4]        # fresh: the sweep trained seed 0
    assert plan["base_config"] == sweep["base_config"] and plan["design"]["looks"] == [4]
    assert len(json.loads((folder / "looks.json").read_text())) == 1
    assert (folder / "report" / "report.md").is_file()
    state = json.loads((folder / "state.json").read_text())
    assert state["mlflow"]["parent_run_id"] == sweep["mlflow"]["parent_run_id"]   # under the sweep's parent run
    parent = MlflowClient(uri).get_run(sweep["mlflow"]["parent_run_id"])
    assert parent.data.tags["tune_bir.plan_sha256.confirm"] == hashlib.sha256(
        (folder / "plan.json").read_bytes()).hexdigest()


@pytest.mark.slow
def test_the_printed_run_one_alone_lines_give_a_sequential_runs_numbers_bit_for_bit(sequential, tmp_path):
    import shlex

    import torch

    from tune_bir import train

    lines = sequential.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run one alone"))
    by_config = dict(line.split(maxsplit=1) for line in lines[start + 1:start + 3])
    assert list(by_config) == ["baseline", "rep"]
    row = next(r for r in _rows(sequential.folder) if (r["config"], r["seed"]) == ("rep", "101"))
    argv = shlex.split(by_config["rep"].replace("--seed=100", "--seed=101"))
    assert argv[:3] == ["python", "-m", "tune_bir.train"] and f"--threads={row['threads']}" in argv
    threads = torch.get_num_threads()
    try:
        assert train.main([*argv[3:], "--results-dir", str(tmp_path), "--run-name", "alone"]) == 0
    finally:
        torch.set_num_threads(threads)   # train sets the process's threads; later tests keep theirs
    record = json.loads((tmp_path / "alone.json").read_text())
    for key in ("acc_avg", "forgetting_avg", "bwt", "val_acc_avg", "acc_task_1", "val_acc_task_5"):
        assert record["final"][key] == float(row[key]), key    # exactly
    assert {k: "" if v is None else str(v) for k, v in record["cpu_fingerprint"].items()} == {
        k: row[k] for k in record["cpu_fingerprint"]}
