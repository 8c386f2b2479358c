"""Search spaces: named spaces, user YAML files, and their one-line errors."""

from pathlib import Path

import optuna
import pytest

import search_spaces
from search_spaces import EXAGGERATION_OFF, NAMED_SPACES, load_space
from tune_bir import terms
from tune_bir.config import BIRConfig
from tune_bir.errors import ConfigError
from tune_bir.sweep.plan import SWEEP_BASE

optuna.logging.set_verbosity(optuna.logging.WARNING)

# the spaces that ship with the project (a YAML file added beside them is a named space too)
BUILT_IN = {"repulsion": {"repulsion"}, "recon": {"recon_repulsion", "recon_attraction"},
            "contrastive": {"contrastive"}, "ewc": {"ewc"},
            "all": {"repulsion", "recon_repulsion", "recon_attraction", "contrastive"}}
PLUGINS = {plugin.switch.name: plugin for plugin in terms.registered()}


def mechanisms(space) -> set[str]:
    return {k for k, v in space.fixed.items() if v is True}


def test_every_yaml_file_is_a_named_space_and_the_built_in_ones_are_there():
    assert set(NAMED_SPACES) == {p.stem for p in Path(search_spaces.__file__).parent.glob("*.yaml")}
    assert set(BUILT_IN) <= set(NAMED_SPACES)
    for name, switches in BUILT_IN.items():
        assert mechanisms(load_space(name)) == switches, name


def samples(space, n: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.sample(study.ask()) for _ in range(n)]


@pytest.mark.parametrize("name", NAMED_SPACES)
def test_named_space_switches_plugins_on_and_searches_only_their_fields(name):
    space = load_space(name)
    switched = mechanisms(space)
    assert switched and switched <= set(PLUGINS)
    # every searched field is declared by a plugin the space switches on: nothing is sampled that cannot act
    assert set(space.param_names) <= {f for s in switched for f in PLUGINS[s].fields()}
    assert set(space.param_names) <= set(BIRConfig.field_names())
    space.validate_against(dict(SWEEP_BASE))


@pytest.mark.parametrize("name", NAMED_SPACES)
def test_every_sample_of_a_named_space_is_a_valid_config(name):
    space = load_space(name)
    for values in samples(space, 60):
        cfg = BIRConfig.from_dict({**SWEEP_BASE, **values}).resolved()
        for mechanism in mechanisms(space):
            assert getattr(cfg, mechanism) is True


@pytest.mark.parametrize("weight", ["lamda_rep", "lamda_recon_rep", "lamda_recon_atr", "c_lr"])
def test_weights_and_learning_rates_are_log_uniform_far_above_their_inert_defaults(weight):
    param = {p.name: p for p in load_space("all").params}[weight]
    default = getattr(BIRConfig(), weight)
    assert param.distribution == "loguniform"
    assert param.high / param.low >= 1e6            # many decades
    assert param.high >= 1e4 * default               # reaching far above the default


def test_rep_f_is_sampled_only_when_the_factor_gate_is_on():
    drawn = samples(load_space("repulsion"), 80, seed=3)
    assert {v["use_rep_f"] for v in drawn} == {True, False}
    for values in drawn:
        assert ("rep_f" in values) == values["use_rep_f"]
        if values["use_rep_f"]:
            assert values["rep_f"] > 1


def test_baseline_switches_every_exaggeration_off():
    cfg = BIRConfig.from_dict({**SWEEP_BASE, "repulsion": True, "use_rep_f": True, **EXAGGERATION_OFF}).resolved()
    assert not cfg.uses_exaggeration and not cfg.use_rep_f


def test_space_records_each_distribution_for_sweep_json():
    described = load_space("repulsion").to_dict()
    assert described["params"]["lamda_rep"] == {"distribution": "loguniform", "low": 1e-2, "high": 1e8}
    assert described["params"]["rep_f"]["when"] == {"use_rep_f": True}
    assert described["fixed"] == {"repulsion": True}


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_user_yaml_space_with_unquoted_exponents_loads(tmp_path):
    # YAML 1.1 reads 1e-3 (no dot) as a string; the loader takes it as the number it means
    space = load_space(write(tmp_path, "fixed: {repulsion: true}\n"
                                       "params:\n  lamda_rep: {loguniform: [1e-3, 1e5]}\n"
                                       "  d_min: {loguniform: [1.0e-4, 1.0e-2]}\n", "mine.yaml"))
    assert space.name == "mine" and space.params[0].low == 1e-3 and space.params[0].high == 1e5
    space.validate_against(dict(SWEEP_BASE))


@pytest.mark.parametrize("text, message", [
    ("params: [oops", "is not valid YAML"),
    ("- a\n- b\n", "must be a mapping"),
    ("params:\n  lamda_repp: {loguniform: [1, 10]}\n", "unknown parameter 'lamda_repp': not a config field "
                                                        "(did you mean lamda_rep?)"),
    ("params:\n  lamda_rep: {loguniform: [10, 1]}\n", "empty range"),
    ("params:\n  lamda_rep: {uniform: [3, 3]}\n", "empty range"),
    ("params:\n  lamda_rep: {loguniform: [0, 1]}\n", "needs low > 0"),
    ("params:\n  kl_js: {choice: []}\n", "non-empty list"),
    ("params:\n  lamda_rep: {normal: [0, 1]}\n", "needs exactly one of"),
    ("params:\n  rep_f: {loguniform: [2, 3], when: {use_rep_f: true}}\n", "must be a parameter listed before"),
    ("params: {}\n", "has no parameters"),
    ("spaces: {}\n", "unknown key(s) spaces"),
])
def test_malformed_user_space_is_a_one_line_config_error(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_space(write(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("fixed: {repulsion: true}\nparams:\n  c_drop: {uniform: [0.0, 1.5]}\n", "c_drop=1.5 is not a valid value"),
    ("fixed: {repulsion: true}\nparams:\n  n_rep: {int: [0, 3]}\n", "n_rep=0 is not a valid value"),
    ("params:\n  lamda_rep: {loguniform: [1, 10]}\n  c_scores: {choice: [true]}\n", "c_scores=True"),
])
def test_values_outside_what_the_config_accepts_are_refused(tmp_path, text, message):
    space = load_space(write(tmp_path, text))
    with pytest.raises(ConfigError, match=message):
        space.validate_against(dict(SWEEP_BASE))


def test_unknown_space_name_lists_the_named_spaces():
    with pytest.raises(ConfigError, match="unknown search space 'repulsoin'; named spaces: ") as info:
        load_space("repulsoin")
    assert all(name in str(info.value) for name in NAMED_SPACES)


def test_missing_space_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_space(str(tmp_path / "nope.yaml"))


def test_base_config_cannot_also_set_a_searched_parameter():
    with pytest.raises(ConfigError, match="sets lamda_rep itself"):
        load_space("repulsion").validate_against({**SWEEP_BASE, "lamda_rep": 3.0})
