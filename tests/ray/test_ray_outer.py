"""The outer loops on Ray islands: unchanged DiLoCo equals the local runtime bitwise; a sync
DiLoCo step survives losing a worker (average over survivors) and a replacement rejoins."""
import functools
import json
import os
import signal
import time

import jax
import numpy as np
import pytest

from pathways_lite.outer import diloco, rules
from pathways_lite.outer.common import Run, memo, zeros_f32
from pathways_lite.outer.inner import pick0, pick1, pick_delta, pick_state
from pathways_lite.outer.snapshot import resolve
from pathways_lite.outer.topology import SERVER
from pathways_lite.ray_islands import IslandLost, from_local, split_survivors
from tests.outer.conftest import tiny_config
from tests.ray import fns


def on_ray(r, cache=None):
    """Swap a Run's local runtime for Ray islands with the same names, clock and links (what a
    `runtime.backend="ray"` config does through from_local)."""
    r.rt = from_local({"backend": "ray", "island_num_cpus": 0.5}, r.rt, compile_cache_dir=cache)
    return r


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """One persistent compilation cache for this module's island actors: the second test's (and
    the replacement's) islands load the programs the first test compiled."""
    return str(tmp_path_factory.mktemp("jax_cache"))


def config(clock):
    return tiny_config("diloco", steps=8, num_workers=2, inner_steps=2, clock=clock,
                       link_bandwidth_gbps=1.0, link_latency_s=0.05)


def run_diloco(config, backend, cache):
    r = Run(config, None)
    if backend == "ray":
        on_ray(r, cache)
    try:
        summary = diloco.train(r)
        params = jax.device_get(resolve(r.state["arrays"]["global"]["params"]))
        workers = [jax.device_get(resolve(w).params) for w in r.state["arrays"]["workers"]]
    finally:
        r.close()
    return summary, params, workers


def test_diloco_on_ray_equals_local_bitwise(ray_cluster, jax_cache):
    c = config("virtual")
    s_local, p_local, w_local = run_diloco(c, "local", None)
    s_ray, p_ray, w_ray = run_diloco(c, "ray", jax_cache)
    for a, b in zip(jax.tree.leaves((p_local, w_local)), jax.tree.leaves((p_ray, w_ray))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k in ("final_val_loss", "final_train_loss", "sim_time_s", "bytes", "tokens"):
        assert s_ray[k] == s_local[k], k
    assert s_ray["bytes"] > 0 and s_ray["sim_time_s"] > 8.0


def test_sync_diloco_survives_a_lost_worker_and_a_replacement_rejoins(ray_cluster, jax_cache, tmp_path):
    c = config("real")
    r = on_ray(Run(c, str(tmp_path)), cache=jax_cache)
    rt, inner, H = r.rt, r.inner, r.H
    update = diloco.make_outer_update(r.outer_opt)
    opt_init = memo(("opt_init", r.outer_opt), lambda: jax.jit(r.outer_opt.init))
    weights = np.asarray(r.weights, np.float32)
    init = inner.init_state(r.seed)
    gp = rt.transfer(init.params, island=SERVER)
    ostate = rt.call(opt_init, gp, island=SERVER, cost=0)
    zeros = rt.call(zeros_f32, gp, island=SERVER, cost=0)
    ws = {w: rt.transfer(init, island=w) for w in r.workers}
    shard = {w: i for i, w in enumerate(r.workers)}
    loss0 = r.evaluate(0, init.params)["loss"]
    kill_at, history, checks = 1, [], {}
    victim_pid = rt.island_info("worker1")["pid"]
    for t in range(c.train.steps // H):
        alive = rt.alive_islands()
        deltas, starts = {}, {}
        for w in r.workers:
            if w not in alive:
                continue
            starts[w] = rt.transfer(gp, island=w, name=f"params->{w}")
            start = starts[w]
            if t == kill_at and w == "worker1":    # its phase is in flight when the actor dies
                start = rt.call(functools.partial(fns.slow_identity, seconds=20.0), start, island=w)
            out = rt.call(inner.phase, ws[w], start, r.batches(shard[w], H), island=w, cost=H)
            ws[w] = rt.call(pick_state, out, island=w, cost=0)
            deltas[w] = rt.transfer(rt.call(pick_delta, out, island=w, cost=0), island=SERVER)
        if t == kill_at:
            time.sleep(1.0)
            os.kill(victim_pid, signal.SIGKILL)
        ok, lost = split_survivors(deltas)                   # waits for this step's deltas
        keep = np.array([w in ok for w in r.workers])
        upd = rt.call(update, gp, ostate, [deltas.get(w, zeros) if w in ok else zeros
                                           for w in r.workers], weights, keep, island=SERVER)
        prev = (gp, ostate)
        gp, ostate = rt.call(pick0, upd, island=SERVER), rt.call(pick1, upd, island=SERVER)
        history.append({"step": t, "workers": sorted(ok), "lost": sorted(lost)})
        r.write((t + 1) * H, {"outer/workers_alive": float(len(ok)), "outer/islands_lost": float(len(lost))})
        if t == kill_at:
            assert set(lost) == {"worker1"} and isinstance(lost["worker1"], IslandLost)
            assert lost["worker1"].island == "worker1"
            # the survivors' average is what was applied (outer optimizer state carried on)
            want = jax.jit(update)(prev[0].result(), prev[1].result(),
                                   [deltas["worker0"].result(), zeros.result()], weights, keep)
            for a, b in zip(jax.tree.leaves(want[:2]), jax.tree.leaves((gp.result(), ostate.result()))):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for w in lost:                                       # rejoins at the next outer step
            info = rt.replace_island(w)
            assert info["pid"] != victim_pid
            ws[w] = rt.transfer(init, island=w)              # fresh inner optimizer state
            frac = [p / it.batches_per_epoch for p, it in zip(r.shard_progress, r.iters)]
            shard[w] = rules.sample_shard(frac, r.rng)       # a fresh data shard assignment
            checks["join_step"] = t + 1
        if t == checks.get("join_step"):
            # the rejoined island started from the global params of its join step
            for a, b in zip(jax.tree.leaves(starts["worker1"].result()), jax.tree.leaves(prev[0].result())):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert "worker1" in ok
    final = jax.device_get(gp.result())
    loss1 = r.evaluate(c.train.steps, final)["loss"]
    r.close()
    assert [h["workers"] for h in history] == [["worker0", "worker1"], ["worker0"]] + \
        [["worker0", "worker1"]] * (len(history) - 2)
    assert loss1 < loss0 - 0.05, (loss0, loss1)
    events = [(m.island, m.event, m.generation) for m in rt.membership if m.island == "worker1"]
    assert events == [("worker1", "joined", 0), ("worker1", "lost", 0), ("worker1", "joined", 1)]
    kinds = [e.kind for e in rt.trace.events() if e.island == "worker1"]
    assert "island_lost" in kinds and "island_joined" in kinds
    r.writer.close()
    rows = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
    alive = [row["values"]["outer/workers_alive"] for row in rows
             if "outer/workers_alive" in row.get("values", {})]
    assert alive[:3] == [2.0, 1.0, 2.0]
