"""Config helpers: the base schema, unknown-field and type errors, allowed values, locking.

The schema is `configs/base.py:get_config()`: every field a run may set. A run
config is checked against it before anything is built or compiled; errors name
the dotted field and what is allowed.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from models.config import ModelConfig, validate_seq_len

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG_PATH = os.path.join(_REPO_ROOT, "configs", "base.py")
DATA_SPLITS = ("iid", "non_iid")


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Imports a config file by path and returns its get_config()."""
  spec = importlib.util.spec_from_file_location(
      f"_pl_config_{abs(hash(os.path.abspath(path)))}", path)
  if spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"config file not found: {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def base_schema() -> ml_collections.ConfigDict:
  """The default config (configs/base.py): the schema every run config must fit."""
  if not os.path.exists(BASE_CONFIG_PATH):
    raise FileNotFoundError(
        f"the config schema {BASE_CONFIG_PATH} is missing; pathways_lite runs from a "
        "checkout of the repository (pass schema= to validate otherwise)")
  return load_config_file(BASE_CONFIG_PATH)


def _as_dict(c) -> dict:
  return c.to_dict() if hasattr(c, "to_dict") else dict(c)


def check_fields(config, schema, prefix: str = "") -> None:
  """Raises ValueError for unknown, missing or wrongly typed fields (dotted names)."""
  cfg, ref = _as_dict(config), _as_dict(schema)
  where = f"'{prefix[:-1]}'" if prefix else "the top level"
  unknown = sorted(set(cfg) - set(ref))
  if unknown:
    raise ValueError(f"unknown config field(s) {[prefix + k for k in unknown]}; allowed "
                     f"fields in {where}: {sorted(ref)}")
  missing = sorted(set(ref) - set(cfg))
  if missing:
    raise ValueError(f"config is missing field(s) {[prefix + k for k in missing]} "
                     f"(start configs from configs/base.py:get_config())")
  for key, default in ref.items():
    value, name = cfg[key], prefix + key
    if isinstance(default, Mapping):
      if not isinstance(value, Mapping):
        raise ValueError(f"config field '{name}' must be a section (ConfigDict), got {value!r}")
      check_fields(value, default, name + ".")
    elif default is not None and not _same_kind(value, default):
      raise ValueError(f"config field '{name}' must be of type {type(default).__name__} "
                       f"(like the default {default!r}), got {value!r}")


def _same_kind(value, default) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def check_choice(field: str, value, allowed: Sequence) -> None:
  if value not in allowed:
    raise ValueError(f"config field '{field}'={value!r} is not allowed; allowed values: "
                     f"{list(allowed)}")


def check_int(field: str, value, minimum: int = 0, maximum: int | None = None) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
      maximum is not None and value > maximum):
    upper = f" and <= {maximum}" if maximum is not None else ""
    raise ValueError(f"config field '{field}' must be an int >= {minimum}{upper}, got {value!r}")


def check_number(field: str, value, lo: float, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> None:
  ok = not isinstance(value, bool) and isinstance(value, (int, float))
  if ok:
    ok = (value > lo if lo_open else value >= lo) and (
        hi is None or (value < hi if hi_open else value <= hi))
  if not ok:
    lo_s = f"{'(' if lo_open else '['}{lo}"
    hi_s = f"{hi if hi is not None else 'inf'}{')' if hi_open or hi is None else ']'}"
    raise ValueError(f"config field '{field}' must be a number in {lo_s}, {hi_s}, got {value!r}")


def model_config(config) -> ModelConfig:
  """config.model -> ModelConfig; its errors are re-raised naming 'model.<field>'."""
  try:
    cfg = ModelConfig.from_dict(config.model)
    validate_seq_len(cfg, config.data.seq_len)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config section 'model' (with data.seq_len={config.data.seq_len}): "
                     f"{e}") from e
  return cfg


def validate(config, schema=None) -> ModelConfig:
  """Checks the whole run config; returns the ModelConfig. Raises ValueError naming the field."""
  check_fields(config, base_schema() if schema is None else schema)
  check_int("seed", config.seed, 0)
  d, t, o = config.data, config.train, config.outer
  if not all(isinstance(s, str) and s for s in d.sources):
    raise ValueError(f"config field 'data.sources' must be a tuple of non-empty file globs, "
                     f"got {d.sources!r}")
  check_int("data.seq_len", d.seq_len, 1)
  check_int("data.batch_size", d.batch_size, 1)
  check_number("data.val_fraction", d.val_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
  check_choice("data.split", d.split, DATA_SPLITS)
  check_int("train.steps", t.steps, 1)
  check_number("train.lr", t.lr, 0.0, lo_open=True)
  check_number("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0)
  check_int("train.warmup_steps", t.warmup_steps, 0, t.steps - 1)
  check_number("train.weight_decay", t.weight_decay, 0.0)
  check_number("train.b1", t.b1, 0.0, 1.0, hi_open=True)
  check_number("train.b2", t.b2, 0.0, 1.0, hi_open=True)
  check_number("train.grad_clip", t.grad_clip, 0.0)
  check_int("train.eval_every", t.eval_every, 0)
  check_int("train.eval_batches", t.eval_batches, 1)
  check_int("train.log_every", t.log_every, 1)
  if not isinstance(o.algorithm, str) or not o.algorithm:
    raise ValueError(f"config field 'outer.algorithm' must be a non-empty string, "
                     f"got {o.algorithm!r}")
  check_int("outer.num_workers", o.num_workers, 1)
  if o.algorithm == "single" and o.num_workers != 1:
    raise ValueError(f"config field 'outer.num_workers'={o.num_workers} needs an outer loop; "
                     "outer.algorithm='single' trains one worker (set num_workers=1)")
  return model_config(config)


def locked_copy(config) -> ml_collections.ConfigDict:
  """A deep copy that refuses new fields (values may still change)."""
  c = ml_collections.ConfigDict(_as_dict(config))
  c.lock()
  return c


def with_overrides(config, overrides: Mapping[str, Any], who: str):
  """A deep copy of config with dotted overrides ({"outer.lr": 0.5}) set; ValueError naming
  `who` and the missing section or field (an override only changes fields that exist)."""
  c = copy.deepcopy(config)
  for dotted, value in overrides.items():
    *path, leaf = dotted.split(".")
    node = c
    for p in path:
      if p not in node:
        raise ValueError(f"{who}: override {dotted!r}: config has no section {p!r}")
      node = node[p]
    if leaf not in node:
      raise ValueError(f"{who}: override {dotted!r}: config section has no field {leaf!r}")
    node[leaf] = value
  return c


def to_json(config) -> str:
  return json.dumps(_as_dict(config), indent=2, sort_keys=True, default=_jsonable)


def _jsonable(x: Any):
  if isinstance(x, (tuple, set)):
    return list(x)
  return str(x)
