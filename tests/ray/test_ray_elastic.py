"""The real outer loops (driver.run_with_state, runtime.backend="ray") survive a SIGKILLed worker:
the step after the loss applies the survivors' average, the replacement rejoins from the global
params, and the metrics, membership and trace record the dip and the rejoin."""
import functools
import json
import os
import signal
import threading

import jax
import numpy as np
import optax
import pytest

from configs import diloco_tiny
from pathways_lite.outer import common, driver
from pathways_lite.ray_backends import runtime_config
from tests.ray import fns


def shrunk(algorithm="diloco", **outer):
    """configs/diloco_tiny.py, shrunk (as tests/outer/conftest.py shrinks the base config)."""
    c = diloco_tiny.get_config()
    c.model.update(d_model=16, num_layers=2, num_heads=2, num_kv_heads=2, max_seq_len=16)
    c.data.update(seq_len=16, batch_size=2)
    c.train.update(steps=8, warmup_steps=1, eval_every=0, eval_batches=1, log_every=1)
    c.outer.update(algorithm=algorithm, num_workers=2, inner_steps=2, clock="real", **outer)
    c.runtime.update(backend="ray", island_num_cpus=0.5)
    return c


def kill_during(monkeypatch, victim, phase_name):
    """Make `victim`'s call named `phase_name` slow, and SIGKILL its actor 1 s after dispatch."""
    real = common.from_local
    fired = {}

    def from_local(cfg, local, **kw):
        rt = real(cfg, local, **kw)
        call = rt.call

        def slow_call(fn, *args, island, name=None, **k):
            if island == victim and name == phase_name and not fired:
                pid = rt.island_info(victim)["pid"]
                fired["pid"] = pid
                args = list(args)
                args[1] = call(functools.partial(fns.slow_identity, seconds=20.0), args[1], island=island)
                threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
            return call(fn, *args, island=island, name=name, **k)
        rt.call = slow_call
        return rt
    monkeypatch.setattr(common, "from_local", from_local)
    return fired


def metric(workdir, key):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [(row["step"], row["values"][key]) for row in rows
            if key in row.get("values", {}) and row.get("worker") is None]


def test_diloco_survives_a_lost_worker_and_the_replacement_rejoins(ray_cluster, monkeypatch, tmp_path):
    c = shrunk()
    fired = kill_during(monkeypatch, "worker1", "phase 1")
    summary, r = driver.run_with_state(c, str(tmp_path))
    assert "pid" in fired
    el = r.elastic
    # the step after the loss applied the survivors' average (weights renormalised), from the
    # pre-step global params and outer optimizer state, computed here independently
    (a,) = el.audit
    assert a["outer_step"] == 1 and a["lost"] == [1] and list(a["keep"]) == [True, False]
    assert set(a["deltas"]) == {0}
    delta = a["deltas"][0]          # one survivor: its weight renormalises to 1
    upd, want_s = r.outer_opt.update(delta, a["prev_opt_state"], a["prev_params"])
    want_p = optax.apply_updates(a["prev_params"], upd)
    for x, y in zip(jax.tree.leaves((want_p, want_s)), jax.tree.leaves((a["params"], a["opt_state"]))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    # the replacement joined at the next outer step from the global params of that step
    (j,) = el.joins
    assert j["worker"] == 1 and j["step"] == 2
    for x, y in zip(jax.tree.leaves(j["start"]), jax.tree.leaves(a["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [e["event"] for e in el.events] == ["lost", "replaced", "joined"]
    # metrics: the dip and the rejoin; the run finished and learned
    assert [v for _, v in metric(tmp_path, "outer/workers_alive")] == [2.0, 1.0, 2.0, 2.0]
    assert [v for _, v in metric(tmp_path, "outer/islands_lost")] == [1.0]
    assert summary["final_val_loss"] < r.evals[0]["loss"]
    # membership and trace
    ev = [(m.island, m.event, m.generation) for m in r.rt.membership if m.island == "worker1"]
    assert ev == [("worker1", "joined", 0), ("worker1", "lost", 0), ("worker1", "joined", 1)]
    kinds = [e.kind for e in r.rt.trace.events() if e.island == "worker1"]
    assert "island_lost" in kinds and "island_joined" in kinds
    trace = open(tmp_path / "trace.json").read()
    assert '"worker1 lost"' in trace and '"worker1 joined"' in trace


def test_diloco_without_replacement_runs_on_with_the_survivors(ray_cluster, monkeypatch, tmp_path):
    c = shrunk()
    c.runtime.replace_lost = False
    kill_during(monkeypatch, "worker1", "phase 1")
    summary, r = driver.run_with_state(c, str(tmp_path))
    assert [v for _, v in metric(tmp_path, "outer/workers_alive")] == [2.0, 1.0, 1.0, 1.0]
    assert r.elastic.joins == [] and r.state["meta"]["elastic"]["out"] == [1]
    assert np.isfinite(summary["final_val_loss"])


def test_async_local_sgd_stops_hearing_from_a_lost_worker(ray_cluster, monkeypatch, tmp_path):
    c = shrunk("async_local_sgd")
    c.runtime.replace_lost = False
    kill_during(monkeypatch, "worker1", "phase (shard 1)")
    summary, r = driver.run_with_state(c, str(tmp_path))
    assert [e["event"] for e in r.elastic.events] == ["lost"]
    assert np.isfinite(summary["final_val_loss"])
    assert summary["tokens"] > 0


def test_runtime_config_errors_name_the_field():
    for field, value in (("backend", "tpu"), ("island_num_cpus", -1.0), ("replace_lost", 1),
                         ("island_devices", 0), ("start_timeout_s", 0.0), ("ray_address", 5)):
        with pytest.raises(ValueError, match=f"runtime.{field}"):
            runtime_config({field: value})
    assert runtime_config(shrunk().runtime)["backend"] == "ray"


@pytest.mark.parametrize("algorithm,outer,victim_call", [
    ("eager", {"eager_mode": "eager", "overlap_outer_steps": 1}, "phase 1"),
    ("streaming", {"num_fragments": 1, "overlap_tau": 1}, "steps ->3"),
])
def test_eager_and_streaming_survive_a_lost_worker(ray_cluster, monkeypatch, tmp_path, algorithm, outer,
                                                   victim_call):
    c = shrunk(algorithm, **outer)
    fired = kill_during(monkeypatch, "worker1", victim_call)
    summary, r = driver.run_with_state(c, str(tmp_path))
    assert "pid" in fired
    assert [e["event"] for e in r.elastic.events] == ["lost", "replaced", "joined"]
    alive = [v for _, v in metric(tmp_path, "outer/workers_alive")]
    assert 1.0 in alive and alive[0] == 2.0 and alive[-1] == 2.0
    assert np.isfinite(summary["final_val_loss"])
