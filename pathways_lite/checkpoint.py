"""Asynchronous, crash-safe checkpoints of a whole run, behind a small interface.

A run's state is two parts:
  arrays: a pytree of jax/numpy arrays (global and per-worker params, optimizer
          states, RNG keys, DN buffers ...), possibly spread over several islands;
  meta:   a JSON-able dict (data iterator positions, step counters, async
          bookkeeping, virtual-clock time, metrics history, config).

`Checkpointer.save` costs the training loop only the dispatch of an on-device
snapshot (one jitted copy per device set): the device-to-host copy and the
Orbax write run on a background thread, so the caller may donate `arrays` to
its next step at once. One save is in flight at a time. When the policy makes
a step due while the previous save is still being written, `if_busy` decides:
"skip" (the default) skips that step's save and logs it, so the save cadence
adapts to the write bandwidth instead of stalling training; "wait" saves it
after waiting for the write (counted in `blocking_s`). Saves the caller asks for
directly (the final one, the one after SIGTERM/SIGINT) are never skipped: they
wait. launch/bench_checkpoint.py reports both policies against the disk's raw
write bandwidth.

Orbax writes each step into a temporary directory and renames it when complete,
so a save killed mid-write never appears as a step. A step whose files are
truncated or corrupted fails to restore: it is skipped with a message naming
it, and the previous complete step is used.

Only this module imports Orbax, so its V1 API can replace the V0 manager here.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SavePolicy:
  """When to save and what to keep.

  every_steps: save when step % every_steps == 0 (0: never by steps).
  every_secs: save when this many seconds passed since the last save (0: never by time).
  keep: keep the latest `keep` checkpoints ...
  keep_every: ... plus every step that is a multiple of `keep_every` (0: none).
  async_save: write on a background thread (False: save() returns when written).
  compress: zstd-compress arrays (about 8% smaller for trained f32 weights, 2-3x slower
            writes here); off by default so a write finishes within the save interval.
  if_busy: a due step while the previous save is still writing: "skip" it (logged) or
           "wait" for the write, then save. The final and preemption saves always wait.
  """
  every_steps: int = 0
  every_secs: float = 0.0
  keep: int = 3
  keep_every: int = 0
  async_save: bool = True
  compress: bool = False
  if_busy: str = "skip"

  def __post_init__(self):
    if self.if_busy not in IF_BUSY:
      raise ValueError(f"config field 'checkpoint.if_busy' must be one of {list(IF_BUSY)}, got {self.if_busy!r}")
    for name in ("every_steps", "keep_every"):
      if getattr(self, name) < 0:
        raise ValueError(f"checkpoint.{name} must be >= 0, got {getattr(self, name)}")
    if self.every_secs < 0:
      raise ValueError(f"checkpoint.every_secs must be >= 0, got {self.every_secs}")
    if self.keep < 1:
      raise ValueError(f"checkpoint.keep must be >= 1, got {self.keep}")

  @classmethod
  def from_config(cls, cfg) -> "SavePolicy":
    """Builds the policy from a `checkpoint` config section (dict or ConfigDict)."""
    cfg = dict(cfg)
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - allowed - {"enabled", "allow_config_change"})
    if unknown:
      raise ValueError(f"unknown checkpoint field(s) {unknown}; allowed: {sorted(allowed)}")
    return cls(**{k: v for k, v in cfg.items() if k in allowed})


IF_BUSY = ("skip", "wait")


class CheckpointError(RuntimeError):
  pass


def _snapshot(arrays):
  """Copies every jax.Array on its own devices (async dispatch), numpy on host.

  Leaves are grouped by device set so that one jitted copy runs per island.
  """
  leaves, treedef = jax.tree.flatten(arrays)
  out = list(leaves)
  groups: dict[tuple, list[int]] = {}
  for i, x in enumerate(leaves):
    if isinstance(x, jax.Array):
      key = tuple(sorted(d.id for d in x.sharding.device_set))
      groups.setdefault(key, []).append(i)
    else:
      out[i] = np.array(x, copy=True)
  for idx in groups.values():
    copies = _copy_tree([leaves[i] for i in idx])
    for i, c in zip(idx, copies):
      out[i] = c
  return jax.tree.unflatten(treedef, out)


@jax.jit
def _copy_tree(xs):
  return [jnp.copy(x) for x in xs]


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  x = np.asarray(x)
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


class Checkpointer:
  """Saves and restores (arrays, meta) under `directory` with a SavePolicy."""

  def __init__(self, directory: str | pathlib.Path, policy: SavePolicy = SavePolicy()):
    self.directory = pathlib.Path(directory).absolute()
    self.policy = policy
    self.directory.mkdir(parents=True, exist_ok=True)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=policy.keep,
        keep_period=policy.keep_every or None,
        enable_async_checkpointing=False,  # our own thread is the async part
        cleanup_tmp_directories=True,
        create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"arrays": ocp.PyTreeCheckpointHandler(use_compression=policy.compress),
                       "meta": ocp.JsonCheckpointHandler()})
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None
    self._last_save_time = time.monotonic()
    self._last_saved_step: int | None = self.latest_step()
    self._due: tuple[int, bool] | None = None     # due's last (step, answer)
    self._asked: tuple[int, bool] | None = None   # should_save's last (step, answer)
    self._prev_asked: int | None = self._last_saved_step
    self.blocking_s: list[float] = []  # time save() held the caller, per save
    self.writes: list[dict] = []       # per finished save: step, bytes, write_s (background)
    self.skipped: list[int] = []       # steps whose due save was skipped (if_busy="skip")
    self.preempted = False
    self._old_handlers: dict[int, Any] = {}

  @property
  def last_saved_step(self) -> int | None:
    """The step of the latest save() (maybe still being written), or the latest on disk."""
    return self._last_saved_step

  # -- policy --------------------------------------------------------------

  def writing(self) -> bool:
    """Whether a background save is still being written."""
    return self._thread is not None and self._thread.is_alive()

  def due(self, step: int) -> bool:
    """Whether the policy makes `step` a save point: a multiple of every_steps (or a step
    that jumps over one since the previous call), or every_secs elapsed. The answer for a
    step does not change when asked again. Loops flush the metrics they hold back at due
    steps, whether the save is then skipped or not, so their records never depend on
    the disk's speed."""
    if self._due is not None and self._due[0] == step:
      return self._due[1]
    prev, self._prev_asked = self._prev_asked, step
    p = self.policy
    due = step != self._last_saved_step and (
        (bool(p.every_steps) and (step % p.every_steps == 0 or (
            prev is not None and step // p.every_steps > prev // p.every_steps)))
        or (bool(p.every_secs) and time.monotonic() - self._last_save_time >= p.every_secs))
    self._due = (step, due)
    return due

  def should_save(self, step: int) -> bool:
    """due(step), unless if_busy="skip" and the previous save is still being written: then
    the step is skipped (logged). The answer for a step does not change when asked again."""
    if self._asked is not None and self._asked[0] == step:
      return self._asked[1]
    save = self.due(step)
    if save and self.policy.if_busy == "skip" and self.writing():
      self.skipped.append(step)
      log.warning("checkpoint: skipping the save of step %d: the save of step %s is still being "
                  "written (checkpoint.if_busy='skip'; %d skipped so far)",
                  step, self._last_saved_step, len(self.skipped))
      save = False
    self._asked = (step, save)
    return save

  # -- save ----------------------------------------------------------------

  def save(self, step: int, arrays, meta: dict | None = None) -> None:
    """Saves (arrays, meta) as `step`; returns once the caller may reuse `arrays`."""
    t0 = time.perf_counter()
    self._join()
    meta = json.loads(json.dumps(meta or {}))  # a private, JSON-able copy, checked now
    snap = _snapshot(arrays)
    self._last_save_time = time.monotonic()
    self._last_saved_step = step
    if self.policy.async_save:
      self._thread = threading.Thread(
          target=self._write, args=(step, snap, meta), name=f"checkpoint-{step}", daemon=True)
      self._thread.start()
      self.blocking_s.append(time.perf_counter() - t0)
    else:
      self._write(step, snap, meta)
      self.blocking_s.append(time.perf_counter() - t0)
      self._raise_pending()

  def _write(self, step, snap, meta):
    t0 = time.perf_counter()
    # Orbax's Python (serialization, asyncio) holds the GIL in slices of the
    # switch interval (5 ms by default): the training thread would wait that
    # long for each dispatch. A short interval while writing keeps it prompt.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, 2e-4))
    try:
      self._manager.save(
          step,
          args=ocp.args.Composite(
              arrays=ocp.args.PyTreeSave(snap), meta=ocp.args.JsonSave(meta)),
          force=True)
      self._manager.wait_until_finished()
      self.writes.append({"step": step, "write_s": time.perf_counter() - t0, "bytes": sum(
          int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(snap))})
    except BaseException as e:  # reported on the caller's thread at the next call
      self._error = e
    finally:
      sys.setswitchinterval(interval)

  def _join(self):
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    self._raise_pending()

  def _raise_pending(self):
    if self._error is not None:
      e, self._error = self._error, None
      raise CheckpointError(f"saving a checkpoint under {self.directory} failed: {e}") from e

  def wait_until_finished(self) -> None:
    self._join()

  # -- restore -------------------------------------------------------------

  def all_steps(self) -> list[int]:
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore(self, like, step: int | None = None):
    """Restores the latest readable step (or `step`) onto the shardings of `like`.

    `like` is a pytree of arrays or jax.ShapeDtypeStruct (with `sharding` set to
    restore onto another device layout), or None to get Orbax's own tree back. Returns (step, arrays, meta), or None
    when the directory holds no checkpoint. Unreadable steps are skipped with a
    warning naming them; if every step is unreadable, raises CheckpointError.
    """
    self._join()
    steps = [step] if step is not None else self.all_steps()[::-1]
    if not steps:
      return None
    abstract = None if like is None else jax.tree.map(_abstract, like)
    failures = []
    for s in steps:
      try:
        restore = (ocp.args.PyTreeRestore() if abstract is None else ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
        out = self._manager.restore(
            s, args=ocp.args.Composite(arrays=restore, meta=ocp.args.JsonRestore()))
        arrays = out["arrays"]
        if like is not None and jax.tree.structure(arrays) != jax.tree.structure(like):
          raise CheckpointError(f"step {s} holds a different tree than the run's state")
        jax.tree.map(lambda a: a.block_until_ready() if isinstance(a, jax.Array) else a, arrays)
        return s, arrays, dict(out["meta"] or {})
      except Exception as e:  # truncated/corrupted files, missing items, shape mismatch
        path = self.directory / str(s)
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        log.warning("checkpoint %s is unreadable (%s); skipping it", path, msg)
        print(f"[checkpoint] skipping unreadable checkpoint {path}: {msg}", flush=True)
        failures.append(f"{path}: {msg}")
    raise CheckpointError(
        "no readable checkpoint; tried:\n  " + "\n  ".join(failures) +
        "\nDelete the broken step directories (or the workdir) to start over.")

  def read_meta(self, step: int) -> dict:
    """The JSON part of a step alone (cheap: no arrays are read)."""
    out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"] or {})

  # -- preemption ----------------------------------------------------------

  def install_preemption_handler(self) -> None:
    """On SIGTERM/SIGINT, sets `self.preempted` so the loop saves and exits.

    A second signal restores the previous handler's behaviour (e.g. Ctrl-C twice).
    """
    def handler(signum, frame):
      if self.preempted:
        old = self._old_handlers.get(signum, signal.SIG_DFL)
        signal.signal(signum, old)
        signal.raise_signal(signum)
        return
      print(f"[checkpoint] received signal {signum}: saving and stopping", flush=True)
      self.preempted = True

    if threading.current_thread() is not threading.main_thread():
      return
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old_handlers[sig] = signal.signal(sig, handler)

  def close(self) -> None:
    try:
      self._join()
    finally:
      for sig, old in self._old_handlers.items():
        signal.signal(sig, old)
      self._old_handlers.clear()
      self._manager.close()


def check_config_compatible(saved: dict, current: dict, *, allow: bool,
                            ignore: tuple[str, ...] = ()) -> list[str]:
  """Compares two flattened-able config dicts; raises on differences unless `allow`.

  Returns the dotted names of differing fields. `ignore` lists dotted prefixes
  that may change on resume (e.g. "train.steps" to extend a run).
  """
  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      key = f"{prefix}{k}"
      if isinstance(v, dict):
        out.update(flat(v, key + "."))
      else:
        out[key] = json.dumps(v, sort_keys=True, default=str)
    return out

  a, b = flat(saved), flat(current)
  diff = sorted(k for k in set(a) | set(b)
                if a.get(k) != b.get(k) and not any(k.startswith(p) for p in ignore))
  if diff and not allow:
    details = "; ".join(f"{k}: saved {a.get(k, '<absent>')} vs now {b.get(k, '<absent>')}"
                        for k in diff[:10])
    raise ValueError(
        f"the workdir holds a run with a different config ({details}); "
        "use a new --workdir, or set --config.checkpoint.allow_config_change=True to resume anyway")
  return diff


# Fields that may differ between a checkpoint's config and the resuming run's.
RESUMABLE_CHANGES = ("name", "checkpoint.", "train.eval_every", "train.log_every")
CHECKPOINT_DIR = "checkpoints"


def for_run(config, workdir: str) -> Checkpointer | None:
  """The run's Checkpointer under <workdir>/checkpoints (None if checkpoint.enabled is off)."""
  if not config.checkpoint.enabled:
    return None
  ck = Checkpointer(pathlib.Path(workdir) / CHECKPOINT_DIR,
                    SavePolicy.from_config(config.checkpoint))
  ck.install_preemption_handler()
  return ck


def resume(ck: Checkpointer | None, config_dict: dict, like, *, allow_config_change: bool):
  """Restores the latest readable checkpoint of a run, checking its config first.

  Returns (step, arrays, meta) or None for a fresh run. The saved config lives in
  meta["config"]; fields other than RESUMABLE_CHANGES must match unless allowed.
  """
  if ck is None or ck.latest_step() is None:
    return None
  try:  # check the config before touching arrays whose shapes it may have changed
    saved_config = ck.read_meta(ck.latest_step()).get("config", {})
  except Exception:  # an unreadable latest step: restore() skips it below
    saved_config = None
  changed = []
  if saved_config is not None:
    changed = check_config_compatible(saved_config, config_dict,
                                      allow=allow_config_change, ignore=RESUMABLE_CHANGES)
  step, arrays, meta = ck.restore(like)
  if changed:
    log.warning("resuming step %d with changed config fields %s", step, changed)
  print(f"[checkpoint] resuming from step {step} in {ck.directory}", flush=True)
  return step, arrays, meta
