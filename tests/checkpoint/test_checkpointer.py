"""Checkpointer: exact round trips, retention, corruption, resharding, async safety."""
import pathlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pathways_lite.checkpoint import (CheckpointError, Checkpointer, SavePolicy,
                                      check_config_compatible)


def _mesh(devs):
  return Mesh(np.array(devs), ("data",))


def _state(devices, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((8, 4)).astype(np.float32)
  v = rng.standard_normal((16,)).astype(np.float32)
  return {
      "worker0": jax.device_put(w, NamedSharding(_mesh(devices[:2]), P("data"))),
      "worker1": {"v": jax.device_put(v, NamedSharding(_mesh(devices[2:4]), P()))},
      "count": np.int64(seed + 7),
      "key": jax.random.key_data(jax.random.key(seed)),
  }


def _assert_same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x).dtype == np.asarray(y).dtype


def test_round_trip_is_bitwise_and_meta_is_kept(tmp_path, devices):
  ck = Checkpointer(tmp_path, SavePolicy(every_steps=1))
  state = _state(devices, seed=1)
  ck.save(5, state, {"iterators": [{"position": 11}], "clock": 2.5})
  step, restored, meta = ck.restore(state)
  assert step == 5 and meta == {"iterators": [{"position": 11}], "clock": 2.5}
  _assert_same(restored, state)
  assert restored["worker0"].sharding == state["worker0"].sharding
  ck.close()


def test_save_returns_before_write_and_caller_may_donate(tmp_path, devices):
  ck = Checkpointer(tmp_path, SavePolicy(every_steps=1, async_save=True))
  state = _state(devices, seed=2)
  expected = jax.tree.map(np.asarray, state)
  ck.save(1, state, {})
  # The training loop donates its state right after save(): delete the buffers.
  for leaf in jax.tree.leaves(state):
    if isinstance(leaf, jax.Array):
      leaf.delete()
  ck.wait_until_finished()
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), expected)
  _, restored, _ = ck.restore(like)
  _assert_same(restored, expected)
  ck.close()


def test_retention_keeps_latest_k_plus_every_mth(tmp_path, devices):
  ck = Checkpointer(tmp_path, SavePolicy(every_steps=1, keep=2, keep_every=4))
  state = _state(devices)
  for s in range(1, 10):
    ck.save(s, state, {"s": s})
  ck.wait_until_finished()
  assert ck.all_steps() == [4, 8, 9]
  ck.close()


def test_should_save_by_steps_and_by_time(tmp_path, monkeypatch):
  ck = Checkpointer(tmp_path / "a", SavePolicy(every_steps=3))
  assert [s for s in range(1, 10) if ck.should_save(s)] == [3, 6, 9]
  ck.close()
  now = [100.0]
  monkeypatch.setattr("pathways_lite.checkpoint.time.monotonic", lambda: now[0])
  ck = Checkpointer(tmp_path / "b", SavePolicy(every_secs=60))
  assert not ck.should_save(1)
  now[0] += 61
  assert ck.should_save(2)
  ck.close()


def _busy(ck):
  """Makes `ck` look as if a save were still being written until the returned event is set."""
  gate = threading.Event()
  ck._thread = threading.Thread(target=gate.wait, daemon=True)
  ck._thread.start()
  return gate


def test_due_step_while_writing_is_skipped_logged_and_sticky(tmp_path, devices, caplog):
  ck = Checkpointer(tmp_path, SavePolicy(every_steps=2))
  gate = _busy(ck)
  assert ck.due(2) and not ck.should_save(2) and ck.skipped == [2]
  assert "skipping the save of step 2" in caplog.text
  gate.set()
  ck._thread.join()
  assert not ck.should_save(2)          # the answer for a step does not change
  assert ck.should_save(5)              # 2 -> 5 jumps over 4: due
  gate = _busy(ck)
  threading.Timer(0.2, gate.set).start()
  ck.save(6, _state(devices), {})       # asked for directly (final, preemption): waits, saves
  assert ck.blocking_s[-1] > 0.1          # it waited for the write in progress
  ck.wait_until_finished()
  assert ck.all_steps() == [6] and ck.skipped == [2]
  ck.close()


def test_wait_policy_saves_due_steps_while_writing(tmp_path):
  ck = Checkpointer(tmp_path, SavePolicy(every_steps=2, if_busy="wait"))
  gate = _busy(ck)
  assert ck.should_save(2) and ck.skipped == []
  gate.set()
  ck.close()


def _corrupt_largest_file(step_dir: pathlib.Path, sub: str):
  files = [p for p in (step_dir / sub).rglob("*") if p.is_file()
           and p.name not in ("commit_success.txt",)]
  target = max(files, key=lambda p: p.stat().st_size)
  data = target.read_bytes()
  target.write_bytes(data[: len(data) // 3])
  return target


@pytest.mark.parametrize("sub", ["arrays", "meta"])
def test_corrupted_latest_is_skipped_with_message(tmp_path, devices, capsys, sub):
  ck = Checkpointer(tmp_path, SavePolicy(every_steps=1, keep=5))
  s1, s2 = _state(devices, seed=1), _state(devices, seed=2)
  ck.save(1, s1, {"which": 1})
  ck.save(2, s2, {"which": 2})
  ck.wait_until_finished()
  _corrupt_largest_file(tmp_path / "2", sub)
  step, restored, meta = ck.restore(s1)
  assert step == 1 and meta == {"which": 1}
  _assert_same(restored, s1)
  assert f"skipping unreadable checkpoint {tmp_path / '2'}" in capsys.readouterr().out
  ck.close()


def test_all_unreadable_raises_naming_them(tmp_path, devices):
  ck = Checkpointer(tmp_path, SavePolicy(every_steps=1))
  s = _state(devices)
  ck.save(3, s, {})
  ck.wait_until_finished()
  _corrupt_largest_file(tmp_path / "3", "arrays")
  with pytest.raises(CheckpointError, match=str(tmp_path / "3")):
    ck.restore(s)
  ck.close()


def test_partial_write_is_not_a_step(tmp_path, devices):
  ck = Checkpointer(tmp_path, SavePolicy(every_steps=1))
  ck.save(1, _state(devices), {})
  ck.close()
  # What a kill during a write leaves behind: Orbax's temporary directory.
  (tmp_path / "2.orbax-checkpoint-tmp-123").mkdir()
  (tmp_path / "2.orbax-checkpoint-tmp-123" / "junk").write_bytes(b"x")
  ck = Checkpointer(tmp_path, SavePolicy(every_steps=1))
  assert ck.all_steps() == [1]
  ck.close()


def test_restore_onto_different_device_count(tmp_path, devices):
  ck = Checkpointer(tmp_path, SavePolicy(every_steps=1))
  state = _state(devices, seed=3)
  ck.save(1, state, {})
  four = NamedSharding(_mesh(devices[4:8]), P("data"))
  like = dict(state, worker0=jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=four))
  _, restored, _ = ck.restore(like)
  assert restored["worker0"].sharding == four
  assert len(restored["worker0"].sharding.device_set) == 4
  _assert_same(restored, state)
  ck.close()


def test_config_compatibility_names_fields():
  saved = {"model": {"d_model": 64, "num_layers": 2}, "train": {"steps": 10}}
  now = {"model": {"d_model": 128, "num_layers": 2}, "train": {"steps": 20}}
  with pytest.raises(ValueError, match="model.d_model"):
    check_config_compatible(saved, now, allow=False, ignore=("train.steps",))
  assert check_config_compatible(saved, now, allow=True) == ["model.d_model", "train.steps"]
  assert check_config_compatible(saved, now, allow=False, ignore=("train.steps", "model")) == []


def test_bad_policy_names_field():
  with pytest.raises(ValueError, match="checkpoint.keep"):
    SavePolicy(keep=0)
  with pytest.raises(ValueError, match="unknown checkpoint field"):
    SavePolicy.from_config({"every_step": 3})
  with pytest.raises(ValueError, match="checkpoint.if_busy"):
    SavePolicy(if_busy="queue")
