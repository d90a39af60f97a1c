"""Run configs: YAML files, dotted overrides, validation errors and the paper defaults."""

from __future__ import annotations

import enum
import typing
from pathlib import Path

import pytest

from e2former_jax.config import LEGACY_LAYER_NORM_EPS, MessagePath, Precision, tiny_config
from train.cli import main as cli_main
from train.config_fields import FieldError, coerce
from train.data.builtin import BuiltinSize
from train.run_config import (LIMITS, EnergyLoss, ForceLoss, ForceMode, RunConfig, config_keys,
                              load_run_config, model_config_from_dict, model_config_to_dict,
                              run_config_from_dict)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path):
  config = load_run_config(path)
  assert run_config_from_dict(config.to_dict()) == config
  model = config.model_config()
  assert model_config_from_dict(model_config_to_dict(model)) == model
  assert model.direct_force_head == (config.loss.forces is ForceMode.DIRECT)


def test_saved_model_config_without_layer_norm_eps_is_legacy():
  """Checkpoints saved before the field existed were trained with flax's 1e-6 and load with it."""
  saved = model_config_to_dict(tiny_config())
  del saved["layer_norm_eps"]
  assert model_config_from_dict(saved).layer_norm_eps == LEGACY_LAYER_NORM_EPS == 1e-6
  assert tiny_config().layer_norm_eps == 1e-5


@pytest.mark.parametrize("flag, expected", [(None, Precision.FULL), (False, Precision.FULL),
                                           (True, Precision.MIXED)])
def test_saved_model_config_without_precision_keeps_its_number_format(flag, expected):
  """Checkpoints saved before ``precision`` existed computed in float32 on every device unless
  their ``mixed_precision`` flag was set; they load with exactly that, not the new AUTO default."""
  saved = model_config_to_dict(tiny_config())
  assert saved.pop("precision") == Precision.AUTO.value
  if flag is not None:
    saved["mixed_precision"] = flag
  assert model_config_from_dict(saved).precision is expected
  assert load_run_config(CONFIGS / "tiny.yaml", ["model.precision=mixed"]).model_config().precision \
      is Precision.MIXED


def test_defaults_are_the_authors_stage2_recipe():
  """docs/model.md §12.7, column "stage 2", with the schedule constants."""
  config = RunConfig()
  assert config.loss.forces is ForceMode.CONSERVATIVE
  assert (config.loss.energy, config.loss.force) == (EnergyLoss.PER_ATOM, ForceLoss.ATOML2MAE)
  assert (config.loss.energy_weight, config.loss.force_weight) == (10.0, 10.0)
  assert (config.optim.lr, config.optim.weight_decay, config.optim.clip_norm) == (6e-4, 1e-3, 100.0)
  optim = config.optim
  assert (optim.warmup_steps, optim.warmup_factor, optim.lr_min_factor) == (4000, 0.2, 0.01)
  assert (config.data.atoms_per_batch, config.train.steps) == (2048, 1_400_000)
  assert config.model_config().channels == 256 and not config.model_config().direct_force_head


def test_overrides_parse_types_and_enums(tmp_path):
  path = tmp_path / "run.yaml"
  path.write_text("model:\n  preset: tiny\n  channels: 16\noptim:\n  lr: 1e-3  # a comment\n")
  config = load_run_config(path, ["optim.lr=2e-3", "model.channels=32", "loss.forces=direct",
                                  "loss.force=l2mae", "data.split=[0.8,0.1,0.1]", "train.steps=7",
                                  "model.message_path=per_edge", "data.path=null", "data.builtin=large"])
  assert config.optim.lr == 2e-3 and isinstance(config.optim.lr, float)
  assert config.loss.forces is ForceMode.DIRECT and config.loss.force is ForceLoss.L2MAE
  assert config.data.split == (0.8, 0.1, 0.1) and config.train.steps == 7 and config.data.path is None
  assert config.data.builtin is BuiltinSize.LARGE
  assert load_run_config(None, ["data.subset_repeat={ion pairs: 4, b: 2.0}"]).data.subset_repeat == {
      "ion pairs": 4, "b": 2}
  model = config.model_config()
  assert model.channels == 32 and model.num_layers == 2 and model.message_path is MessagePath.PER_EDGE
  assert model.direct_force_head
  assert config.decay_steps == 7


@pytest.mark.parametrize("overrides, message", [
    (["optim.learning_rate=1"], "unknown key optim.learning_rate"),
    (["optimizer.lr=1"], "unknown section 'optimizer'"),
    (["optim.lr"], "section.key=value"),
    (["loss.forces=sideways"], "loss.forces must be one of"),
    (["data.builtin=huge"], "data.builtin must be one of"),
    (["model.channelz=3"], "unknown model field 'channelz'"),
    (["model.preset=huge"], "model.preset must be one of"),
    (["model.channels=30", "model.num_heads=4"], "multiple of num_heads"),
])
def test_bad_configs_fail_with_one_clear_error(overrides, message):
  with pytest.raises(ValueError, match=message):
    load_run_config(None, overrides)


def test_bad_yaml_names_the_file(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("train:\n  stepz: 3\n")
  with pytest.raises(ValueError, match=r"bad\.yaml.*unknown key train\.stepz"):
    load_run_config(path)
  with pytest.raises(ValueError, match="does not exist"):
    load_run_config(tmp_path / "missing.yaml")


def test_cli_reports_a_bad_override_in_one_line(capsys):
  from train.cli import main

  assert main(["train", "--set", "optim.lrr=1", "--quiet"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and "optim.lrr" in err[0]


# A value of the wrong type for each kind of field (YAML text, as after --set key=).
_WRONG_TYPED = {int: ["abc", "2.5", "[1]"], float: ["abc", "true", "[1]"], bool: ["abc", "1"],
                str: ["[1, 2]", "{a: 1}"], tuple: ["abc", "[0.5, 0.5]"], dict: ["abc", "[1]", "{a: b}"]}
# The words the error uses for the expected type.
_EXPECTED_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                   tuple: "a list of 3 numbers", dict: "a mapping of strings to integers"}


def _kind(annotation):
  """int, float, bool, str, tuple, dict or an Enum class, with ``| None`` removed."""
  if typing.get_origin(annotation) in (tuple, dict):
    return typing.get_origin(annotation)
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  return _kind(args[0]) if args else annotation


def _wrong_typed_cases():
  for key, annotation in sorted(config_keys().items()):
    kind = _kind(annotation)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
      yield pytest.param(key, "sideways", "one of", id=f"{key}=sideways")
      continue
    for value in _WRONG_TYPED[kind]:
      yield pytest.param(key, value, _EXPECTED_WORDS[kind], id=f"{key}={value}")


@pytest.mark.parametrize("key, value, expected", list(_wrong_typed_cases()))
def test_every_key_rejects_a_wrong_typed_value_in_one_line(key, value, expected, tmp_path, monkeypatch,
                                                           capsys):
  """Generated from the config dataclasses: a key added to them is covered here automatically."""
  monkeypatch.chdir(tmp_path)
  assert cli_main(["train", "--set", f"{key}={value}", "--workdir", "run", "--quiet"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and f" {key} must be {expected}" in err[0], err
  assert not list(tmp_path.iterdir())  # nothing loaded, nothing written


def _out_of_range(key):
  """A value of the key's type that its limit rejects."""
  for value in (-5, 0, 1, 2.5, [0.5, 0.6, 0.1], "ignore", {"a": 0}):
    try:
      typed = coerce(key, value, config_keys()[key], source="test")
    except FieldError:
      continue
    if not LIMITS[key].holds(typed):
      return value
  raise AssertionError(f"no out-of-range candidate for {key}")


@pytest.mark.parametrize("key", sorted(LIMITS))
def test_every_limit_names_its_key(key, capsys):
  limit = LIMITS[key]
  value = _out_of_range(key)
  assert cli_main(["train", "--set", f"{key}={value}", "--quiet"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and f" {key} must be {limit.description}, got " in err[0], err


def test_steps_out_of_range_names_train_steps_not_the_schedule():
  with pytest.raises(ValueError, match=r"override 'train.steps=-5': train.steps must be > 0, got -5"):
    load_run_config(None, ["train.steps=-5"])
  assert load_run_config(None, ["train.steps=1e5"]).train.steps == 100_000  # YAML 1.1 reads a string


def test_yaml_values_are_checked_like_overrides(tmp_path):
  path = tmp_path / "run.yaml"
  path.write_text("train:\n  steps: abc\n")
  with pytest.raises(ValueError, match=r"run\.yaml: train\.steps must be an integer or null, got 'abc'"):
    load_run_config(path)
  path.write_text("model:\n  channels: [16]\n")
  with pytest.raises(ValueError, match=r"run\.yaml: model\.channels must be an integer, got \[16\]"):
    load_run_config(path)


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
  path = tmp_path / "broken.yaml"
  path.write_text("train:\n  steps: 3\n  eval_every: [10\n  log_every: 1\n")
  assert cli_main(["train", "--config", str(path), "--quiet"]) == 2
  err = capsys.readouterr().err.splitlines()
  # The unclosed list of line 3 turns out wrong at the ':' of line 4, column 12.
  assert err == [f"error: {path}:4:12: invalid YAML: expected ',' or ']', but got ':'"], err
  with pytest.raises(ValueError, match=r"override 'train.steps=\[3': the value is not valid YAML"):
    load_run_config(None, ["train.steps=[3"])
