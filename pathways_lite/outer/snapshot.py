"""A committed outer-loop state to a checkpoint and back, Futures included.

`ckpt_state` takes (arrays, meta) to save from `Run.commit`'s state without
changing the run's schedule, recording every Future (island, times, queue
position) in meta["futures"]; `place_restored` lays restored arrays out like
the fresh run's state and recreates those Futures (`Run.resume`). `resolve`
waits for the Futures of a pytree.
"""
from __future__ import annotations

import json

import jax

from pathways_lite.futures import FINISHED, MISSING, Future


def _is_future(x) -> bool:
  return isinstance(x, Future)


def ckpt_state(rt, state: dict) -> tuple[dict, dict]:
  """(arrays, meta) to save from a commit, without changing the run's schedule.

  Under the virtual clock every Future already holds its value (dispatch is
  eager; only its delivery waits for simulated time), so the values are taken
  without waiting (waiting would deliver events early and change what a later
  `wait` returns). Each Future is recorded in meta["futures"] by its tree path
  with its island, times and queue position, to be recreated on resume.
  The real clock waits for the values.
  """
  meta = json.loads(json.dumps(state["meta"]))
  leaves, tdef = jax.tree_util.tree_flatten_with_path(state["arrays"], is_leaf=_is_future)
  seq = {}
  if rt.virtual:
    seq = {id(f): s for _, s, f in rt.clock.pending()}
  futures, values = {}, []
  for path, x in leaves:
    if isinstance(x, Future):
      if rt.virtual and x._exc is None and x._get_value() is not MISSING:
        v = x._get_value()
      else:
        v = x.result()
      futures[_norm(path)] = {
          "island": x.island, "name": x.name, "times": list(x.times),
          "pending": x._state < FINISHED, "seq": seq.get(id(x), -1)}
      x = v
    values.append(x)
  if rt.virtual:  # clock and links as they are now (the commit's may predate dispatches)
    meta["runtime"] = {"clock": rt.clock.state_dict(), "links": rt.links.state_dict()}
  meta["futures"] = futures
  return jax.tree_util.tree_unflatten(tdef, values), meta


def _norm(path) -> str:
  """A tree path as "a/b/0" (dict keys, attribute names and list indices alike)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def place_restored(rt, arrays, like, futures: dict):
  """Restored arrays -> onto like's structure and shardings (or their island's); Futures recreated."""
  import jax.numpy as jnp
  from pathways_lite import network

  like_by_path = {}
  if like is not None:
    for path, x in jax.tree_util.tree_flatten_with_path(like, is_leaf=_is_future)[0]:
      like_by_path[_norm(path)] = x
  made = []

  def put(value, target, island):
    if isinstance(target, Future):
      target = target.result()
    isl = rt.island(island) if island is not None else None
    if target is not None:   # the fresh state's structure (dataclasses, tuples) and shardings
      got = {_norm(p): v for p, v in jax.tree_util.tree_flatten_with_path(value)[0]}
      tl, tdef = jax.tree_util.tree_flatten_with_path(target)
      out = []
      for p, t in tl:
        v = got.pop(_norm(p))
        if isinstance(t, jax.Array):
          sh = t.sharding
          # A Future's value lives on its island (the fresh one may be an uncommitted array
          # on the default device, e.g. an optimizer's zeros).
          if isl is not None and set(sh.device_set) != set(isl.devices):
            sh = network.target_sharding(t, isl)
          v = jax.device_put(jnp.asarray(v, dtype=t.dtype), sh)
        out.append(v)
      if got:
        raise ValueError(f"checkpoint leaves {sorted(got)[:5]} are not in the run's state")
      return jax.tree_util.tree_unflatten(tdef, out)
    if island is None:
      return value
    return jax.tree.map(lambda v: jax.device_put(v, network.target_sharding(v, rt.island(island))),
                        value)

  def walk(x, path):
    key = "/".join(path)
    if key in futures:
      info = futures[key]
      v = put(x, like_by_path.get(key), info["island"])
      f = Future(rt, info["island"], info["name"])
      f._value = v
      f._parents = ()
      f._t_enq, f._t_start, f._t_end = info["times"]
      made.append((0 if not info["pending"] else 1, info["seq"], len(made), f))
      return f
    if key in like_by_path:
      return put(x, like_by_path[key], None)
    if isinstance(x, dict):
      if x and all(str(k).isdigit() for k in x):   # a list saved by Orbax as {"0": ...}
        x = [x[k] for k in sorted(x, key=int)]
      else:
        return {k: walk(v, path + (str(k),)) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return type(x)(walk(v, path + (str(i),)) for i, v in enumerate(x))
    return x

  out = walk(arrays, ())
  for _, _, _, f in sorted(made, key=lambda e: e[:3]):
    if rt.virtual:   # delivered in their original order (finished ones first, at once)
      rt.clock.push(f._t_end, f)
    else:
      rt._engine.finish(f, None)
  return out


def resolve(tree):
  """Futures inside a pytree -> their values (host wait)."""
  return jax.tree.map(lambda x: x.result() if isinstance(x, Future) else x, tree,
                      is_leaf=lambda x: isinstance(x, Future))
