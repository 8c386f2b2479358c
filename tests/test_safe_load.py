"""Safe loading: every torch file is read with weights_only=True, and every file that is not what it should be
(missing, empty, truncated, bit-flipped, text, a foreign pickle, another format, another config) is refused in
one line that names it. The files are written here for real, byte by byte. Also: the task-1 learner cache is
keyed by the CONTENT of the conv layers file."""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from trainables import BIRTrainable, data_cache, first_task_cache
from trainables.bir import CHECKPOINT_FILE
from trainables.node_cache import CACHE_DIR_ENV, content_digest
from tune_bir.augment import AuxDecoder
from tune_bir.config import BIRConfig
from tune_bir.engine import Engine
from tune_bir.errors import ConfigError
from tune_bir.nets import ConvLayers, load_aux_decoder, load_conv_layers
from tune_bir.safe_load import load_torch_file

BASE = dict(replay="generative", brain_inspired=True, si=True, val_fraction=0.1, iters=3, batch=16, device="cpu",
            share_first_task=False)


class _Payload:
    """A pickle that runs code when it is loaded without weights_only: it would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _flip_a_tensor_byte(path: Path) -> None:
    """Flip one bit inside a stored tensor's bytes (not in the zip's bookkeeping): torch alone reads it silently."""
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 4)
    data = bytearray(path.read_bytes())
    # the member's bytes follow its local header: 30 bytes + name + extra field (torch aligns data to 64)
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    start = member.header_offset + 30 + name_len + extra_len
    data[start + member.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _damaged_files(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a file that is not a good torch file, a phrase its refusal must hold)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = good.read_bytes()
    cases: dict[str, tuple[bytes | None, str]] = {
        "empty": (b"", "empty"),
        "truncated": (raw[: len(raw) // 2], "truncated"),
        "text": (b"step,acc\n1,0.5\n", "not a file torch.save wrote"),
        "foreign_pickle": (pickle.dumps(_Payload(folder / "MARKER")), "not a file torch.save wrote"),
        "foreign_pickle_protocol_2": (pickle.dumps(_Payload(folder / "MARKER"), protocol=2), "holds Python objects"),
        "torch_saved_object": (None, "holds Python objects"),
        "bit_flipped": (None, "checksum mismatch"),
    }
    files = {}
    for name, (content, phrase) in cases.items():
        path = folder / f"{name}.pt"
        if name == "torch_saved_object":
            torch.save({"engines": [_Payload(folder / "MARKER")]}, path)
        elif name == "bit_flipped":
            path.write_bytes(raw)
            _flip_a_tensor_byte(path)
        else:
            path.write_bytes(content)
        files[name] = (path, phrase)
    return files


def _assert_one_line_naming(err: pytest.ExceptionInfo, path: Path, phrase: str) -> None:
    message = str(err.value)
    assert "\n" not in message and str(path) in message and phrase in message, message


# ---- the loader every torch file goes through

def test_every_damaged_or_foreign_file_is_refused_in_one_line_and_runs_no_code(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(64.0)}, good)
    assert torch.equal(load_torch_file(good, "test file", verify=True)["w"], torch.arange(64.0))
    files = _damaged_files(tmp_path / "bad", good)
    # the bit flip is a real fault: torch itself loads the damaged tensor without a word
    assert not torch.equal(torch.load(files["bit_flipped"][0], weights_only=True)["w"], torch.arange(64.0))
    for name, (path, phrase) in files.items():
        with pytest.raises(ConfigError) as err:
            load_torch_file(path, "test file", verify=True)
        _assert_one_line_naming(err, path, phrase)
        assert "test file" in str(err.value), name
    with pytest.raises(ConfigError, match="no such file"):
        load_torch_file(tmp_path / "absent.pt", "test file")
    assert not (tmp_path / "bad" / "MARKER").exists()   # no pickle's code ran


def test_no_torch_load_in_the_project_reads_without_weights_only():
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("tune_bir", "trainables", "benchmarks", "analysis"):
        for source in (root / folder).rglob("*.py"):
            for number, line in enumerate(source.read_text().splitlines(), start=1):
                if "torch.load(" in line and "weights_only=True" not in line and not line.lstrip().startswith("#"):
                    offenders.append(f"{source.relative_to(root)}:{number}")
                if "weights_only=False" in line:
                    offenders.append(f"{source.relative_to(root)}:{number}")
    assert not offenders


# ---- trial checkpoints

@pytest.fixture(scope="module")
def saved_trial(tmp_path_factory) -> tuple[dict, Path]:
    """A real trial checkpoint after one task: (the trial config, the checkpoint folder)."""
    config = dict(BASE, repulsion=True, lamda_rep=10.0)
    trainable = BIRTrainable(config=config)
    trainable.train()
    folder = tmp_path_factory.mktemp("trial-ckpt")
    trainable.save_checkpoint(str(folder))
    return config, folder


def _checkpoint_folder_with(tmp_path: Path, name: str, source: Path) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / CHECKPOINT_FILE).write_bytes(source.read_bytes())
    return folder


def test_a_trial_checkpoint_is_plain_data_and_restores(saved_trial):
    config, folder = saved_trial
    state = torch.load(folder / CHECKPOINT_FILE, weights_only=True)   # no pickled objects in it at all
    assert isinstance(state["engines"][0]["config"], dict)
    restored = BIRTrainable(config=config)
    restored.load_checkpoint(str(folder))
    assert restored.engines[0].task == 1


def test_damaged_and_foreign_trial_checkpoints_are_refused(saved_trial, tmp_path):
    config, folder = saved_trial
    trainable = BIRTrainable(config=config)
    for name, (path, phrase) in _damaged_files(tmp_path / "files", folder / CHECKPOINT_FILE).items():
        target = _checkpoint_folder_with(tmp_path, name, path)
        with pytest.raises(ConfigError) as err:
            trainable.load_checkpoint(str(target))
        _assert_one_line_naming(err, target / CHECKPOINT_FILE, phrase)
        assert "trial checkpoint" in str(err.value)
    assert not (tmp_path / "files" / "MARKER").exists()
    # a torch file that is not a checkpoint (e.g. conv layers copied to the wrong place)
    conv_folder = tmp_path / "conv"
    conv_folder.mkdir()
    torch.save({"state": ConvLayers().state_dict()}, conv_folder / CHECKPOINT_FILE)
    with pytest.raises(ConfigError, match="not a trial checkpoint"):
        trainable.load_checkpoint(str(conv_folder))


def _rewritten(saved: Path, tmp_path: Path, name: str, change) -> Path:
    state = torch.load(saved / CHECKPOINT_FILE, weights_only=True)
    change(state)
    folder = tmp_path / name
    folder.mkdir()
    torch.save(state, folder / CHECKPOINT_FILE)
    return folder


@pytest.mark.parametrize(("name", "change", "phrase"), [
    ("older_trial_format", lambda s: s.update(format=0), "format 0; this code reads format 1 only"),
    ("older_engine_format", lambda s: s["engines"][0].update(format=3), "learner has format 3"),
    ("other_seed_count", lambda s: s["engines"].append(s["engines"][0]), "holds 2 seed(s), this trial trains 1"),
    ("no_engines", lambda s: s.pop("engines"), "incomplete"),
    ("config_field_absent", lambda s: s["engines"][0]["config"].pop("lamda_rep"), "lamda_rep=<absent>"),
])
def test_checkpoints_of_another_format_are_refused(saved_trial, tmp_path, name, change, phrase):
    config, folder = saved_trial
    target = _rewritten(folder, tmp_path, name, change)
    with pytest.raises(ConfigError) as err:
        BIRTrainable(config=config).load_checkpoint(str(target))
    _assert_one_line_naming(err, target / CHECKPOINT_FILE, phrase)


@pytest.mark.parametrize(("other", "phrase"), [
    (dict(lamda_rep=1.0), "lamda_rep=10.0 (here 1.0)"),                 # same shapes: would load silently
    (dict(fc_units=50), "fc_units"),                                       # other shapes
    (dict(repulsion=False, contrastive=True, c_lr=1e-3), "contrastive"),   # other terms
])
def test_a_checkpoint_written_by_another_config_is_refused(saved_trial, other, phrase):
    config, folder = saved_trial
    with pytest.raises(ConfigError) as err:
        BIRTrainable(config=dict(config, **other)).load_checkpoint(str(folder))
    _assert_one_line_naming(err, folder / CHECKPOINT_FILE, "written by another config")
    assert phrase in str(err.value)


def test_a_checkpoint_restores_with_other_output_fields(saved_trial):
    config, folder = saved_trial
    BIRTrainable(config=dict(config, run_name="elsewhere", segment_iters=3)).load_checkpoint(str(folder))


def test_a_damaged_first_task_cache_file_is_retrained_not_read(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    cfg = BIRConfig(**{k: v for k, v in BASE.items() if k != "share_first_task"}).resolved()
    engine = Engine(cfg)
    path = first_task_cache.cache_dir() / f"first-task-{cfg.experiment}-{first_task_cache.first_task_key(engine)}.pt"
    path.write_bytes(pickle.dumps(_Payload(tmp_path / "MARKER")))
    trained = first_task_cache.STATS["trained"]
    metrics = first_task_cache.train_or_adopt_first_task(engine)
    assert metrics[first_task_cache.SHARED_KEY] == 0.0 and first_task_cache.STATS["trained"] == trained + 1
    assert not (tmp_path / "MARKER").exists()
    assert torch.load(path, weights_only=True)["format"] == first_task_cache.CACHE_FORMAT   # replaced


def test_a_damaged_data_cache_file_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    data_cache.clear_memo()
    cfg = BIRConfig(**{k: v for k, v in BASE.items() if k != "share_first_task"}).resolved()
    path = data_cache.cache_dir() / f"{cfg.experiment}-{data_cache.data_key(cfg)}.pt"
    path.write_bytes(b"half a file")
    built = data_cache.STATS["built"]
    data = data_cache.hidden_data(cfg, torch.device("cpu"))
    assert data_cache.STATS["built"] == built + 1 and len(data.train) == 5
    data_cache.clear_memo()


# ---- conv layers files

def test_damaged_conv_layer_files_are_refused_in_one_line(tmp_path):
    good = tmp_path / "conv.pt"
    torch.save({"state": ConvLayers().state_dict()}, good)
    for path, phrase in _damaged_files(tmp_path / "bad", good).values():
        with pytest.raises(ConfigError) as err:
            load_conv_layers(path, torch.device("cpu"))
        _assert_one_line_naming(err, path, phrase)
        with pytest.raises(ConfigError) as err:
            load_aux_decoder(path, torch.device("cpu"))
        _assert_one_line_naming(err, path, phrase)
    assert not (tmp_path / "bad" / "MARKER").exists()
    with pytest.raises(ConfigError, match="holds no trained auxiliary decoder"):
        load_aux_decoder(good, torch.device("cpu"))
    state_of_strings = tmp_path / "strings.pt"
    torch.save({"state": dict.fromkeys(ConvLayers().state_dict(), "x")}, state_of_strings)
    with pytest.raises(ConfigError, match="does not hold a state dict"):
        load_conv_layers(state_of_strings, torch.device("cpu"))


def test_a_trained_auxiliary_decoder_of_another_shape_is_refused_in_one_line(tmp_path, fake_cifar_dir):
    """A conv file whose stored auxiliary decoder does not fit ours (another version of `pretrain`): the engine
    stops with one line naming the file and the mismatch, not torch's multi-line load_state_dict report."""
    conv = tmp_path / "conv.pt"
    aux = AuxDecoder().state_dict()
    first = next(iter(aux))
    aux[first] = torch.zeros(*(n + 1 for n in aux[first].shape))
    torch.save({"state": ConvLayers().state_dict(), "aux_decoder": aux}, conv)
    cfg = BIRConfig(experiment="CIFAR100", data_dir=str(fake_cifar_dir), pretrained_conv=str(conv), tasks=2,
                    replay="generative", brain_inspired=True, si=True, c=1e8, dg_prop=0.6, iters=2, batch=8,
                    fc_units=64, device="cpu", contrastive=True, aux_decoder="trained")
    with pytest.raises(ConfigError) as err:
        Engine(cfg)
    _assert_one_line_naming(err, conv, "does not match the auxiliary decoder")
    assert first in str(err.value)
    torch.manual_seed(5)
    trained = AuxDecoder().state_dict()
    torch.save({"state": ConvLayers().state_dict(), "aux_decoder": trained}, conv)
    loaded = [term.aux_decoder.state_dict() for term in Engine(cfg).terms if hasattr(term, "aux_decoder")]
    assert len(loaded) == 1 and all(torch.equal(loaded[0][k], v) for k, v in trained.items())


# ---- the task-1 learner cache is keyed by the conv file's content

def _write_conv(path: Path, seed: int, mtime_ns: int) -> None:
    torch.manual_seed(seed)
    torch.save({"state": ConvLayers().state_dict()}, path)
    # distinct modification times, as minutes of `pretrain` give them (some file systems tick in seconds)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_the_first_task_learner_is_keyed_by_the_content_of_the_conv_file(tmp_path, monkeypatch, fake_cifar_dir):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    conv = tmp_path / "conv.pt"
    cfg = BIRConfig(experiment="CIFAR100", data_dir=str(fake_cifar_dir), pretrained_conv=str(conv), tasks=2,
                    replay="generative", brain_inspired=True, si=True, c=1e8, dg_prop=0.6, iters=2, batch=8,
                    fc_units=64, device="cpu")

    def first_task(seed: int, mtime_s: int) -> tuple[float, str]:
        _write_conv(conv, seed, mtime_s * 10**9)
        engine = Engine(cfg)
        key = first_task_cache.first_task_key(engine)
        return first_task_cache.train_or_adopt_first_task(engine)[first_task_cache.SHARED_KEY], key

    shared_v1, key_v1 = first_task(seed=1, mtime_s=1_000)
    shared_v2, key_v2 = first_task(seed=2, mtime_s=2_000)    # `pretrain` re-run to the same path
    shared_v2_again, key_v2_again = first_task(seed=2, mtime_s=3_000)   # same bytes rewritten
    assert (shared_v1, shared_v2, shared_v2_again) == (0.0, 0.0, 1.0)
    assert key_v1 != key_v2 == key_v2_again


def test_a_file_is_hashed_once_per_version(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 100)
    os.utime(path, ns=(10**9, 10**9))
    first = content_digest(path)
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: reads.append(a) or real_open(*a, **k))
    assert content_digest(path) == first and not reads          # memo: same path, size and mtime
    path.write_bytes(b"b" * 100)
    os.utime(path, ns=(2 * 10**9, 2 * 10**9))
    assert content_digest(path) != first and len(reads) == 1
    assert content_digest(tmp_path / "absent") is None
