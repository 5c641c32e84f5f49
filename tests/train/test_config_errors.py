"""Bad configs raise a clear ValueError naming the field, before anything is compiled."""
import os

import pytest

from pathways_lite import configuration
from pathways_lite import train as train_lib
from tests.data.small_corpus import make_small_corpus
from tests.train.helpers import REPO, small_config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  return make_small_corpus(tmp_path_factory.mktemp("src"))


@pytest.fixture
def no_compile(monkeypatch):
  """Fails the test if training gets as far as building the model or its step."""
  def forbidden(*a, **k):
    raise AssertionError("reached model construction: the error came too late")
  monkeypatch.setattr(train_lib, "init_train_state", forbidden)
  monkeypatch.setattr(train_lib, "make_train_step", forbidden)


def _run(config, workdir):
  return train_lib.train_and_evaluate(config, str(workdir))


@pytest.mark.parametrize("path", ["base.py", "tiny.py", "lm_125m.py"])
def test_config_files_load_by_path_and_validate(path):
  c = configuration.load_config_file(os.path.join(REPO, "configs", path))
  model_cfg = configuration.validate(c)
  assert model_cfg.max_seq_len >= c.data.seq_len


def test_unknown_field_names_dotted_path(source, tmp_path, no_compile):
  c = small_config(source, str(tmp_path / "cache"))
  with c.unlocked():
    c.train.learning_rate = 0.1
  with pytest.raises(ValueError, match=r"unknown config field.*'train\.learning_rate'.*"
                                       r"allowed fields in 'train'.*'lr'"):
    _run(c, tmp_path / "run")
  c = small_config(source, str(tmp_path / "cache"))
  with c.unlocked():
    c.optimiser = "adamw"
  with pytest.raises(ValueError, match=r"unknown config field.*'optimiser'.*top level"):
    _run(c, tmp_path / "run")


def test_unknown_model_field(source, tmp_path, no_compile):
  c = small_config(source, str(tmp_path / "cache"))
  with c.unlocked():
    c.model.n_layers = 3
  with pytest.raises(ValueError, match=r"'model\.n_layers'"):
    _run(c, tmp_path / "run")


def test_heads_not_dividing_width(source, tmp_path, no_compile):
  c = small_config(source, str(tmp_path / "cache"), **{"model.num_heads": 3,
                                                       "model.num_kv_heads": 3})
  with pytest.raises(ValueError, match=r"model.*num_heads=3 must divide d_model=32"):
    _run(c, tmp_path / "run")


def test_seq_len_above_max(source, tmp_path, no_compile):
  c = small_config(source, str(tmp_path / "cache"), **{"data.seq_len": 65})
  with pytest.raises(ValueError, match=r"seq_len=65 exceeds model max_seq_len=64"):
    _run(c, tmp_path / "run")


@pytest.mark.parametrize("key,value,match", [
    ("data.split", "by_topic", r"'data\.split'='by_topic' is not allowed.*'iid', 'non_iid'"),
    ("train.warmup_steps", 40, r"'train\.warmup_steps' must be an int >= 0 and <= 39"),
    ("data.val_fraction", 0.0, r"'data\.val_fraction'"),
    ("outer.num_workers", 2, r"'outer\.num_workers'=2 .*'single'"),
])
def test_bad_values(source, tmp_path, no_compile, key, value, match):
  c = small_config(source, str(tmp_path / "cache"))
  section, field = key.split(".")
  with c.unlocked():
    c[section][field] = value
  with pytest.raises(ValueError, match=match):
    _run(c, tmp_path / "run")


def test_wrong_type_names_field():
  schema = configuration.base_schema()
  c = schema.to_dict()
  c["train"]["steps"] = "10"  # ConfigDicts refuse this themselves; plain dicts may not
  with pytest.raises(ValueError, match=r"'train\.steps' must be of type int"):
    configuration.check_fields(c, schema)
  c["train"]["steps"], c["train"]["lr"] = 10, 1  # an int where a float is expected is fine
  configuration.check_fields(c, schema)


def test_workdir_not_writable(source, tmp_path, no_compile):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  c = small_config(source, str(tmp_path / "cache"))
  with pytest.raises(ValueError, match=r"workdir .*a_file/run.* is not a writable directory"):
    _run(c, blocker / "run")


def test_empty_glob_and_unreadable_file(source, tmp_path, no_compile):
  c = small_config(str(tmp_path / "none" / "*.txt"), str(tmp_path / "cache"))
  with pytest.raises(ValueError, match=r"data\.sources\[0\].*matches no files"):
    _run(c, tmp_path / "run")
  os.makedirs(tmp_path / "docs")
  os.symlink(tmp_path / "missing.txt", tmp_path / "docs" / "dangling.txt")
  c = small_config(str(tmp_path / "docs" / "*.txt"), str(tmp_path / "cache"))
  with pytest.raises(ValueError, match=r"cannot read corpus file .*dangling\.txt"):
    _run(c, tmp_path / "run")

