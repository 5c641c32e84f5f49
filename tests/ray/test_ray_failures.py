"""Losing an island: IslandLost for its pending and later futures, the rest goes on, replacement."""
import functools
import json
import os
import signal
import time

import numpy as np
import pytest

from pathways_lite.futures import wait
from pathways_lite.ray_islands import IslandLost, IslandStartError, RayIsland, RayRuntime
from tests.ray import fns


@pytest.fixture(scope="module")
def rt(ray_cluster):
    r = RayRuntime([RayIsland("w0", num_cpus=0.5), RayIsland("w1", num_cpus=0.5)])
    yield r
    r.shutdown()


def test_killed_island_fails_its_futures_and_the_rest_goes_on(rt, tmp_path):
    before = rt.call(fns.add1, np.float32(5), island="w1")
    assert float(before.result(timeout=60)) == 6.0
    slow = rt.call(functools.partial(fns.sleep_then, seconds=30.0), np.float32(1), island="w1")
    queued = rt.call(fns.add1, slow, island="w1")                 # pending behind it
    cross = rt.call(fns.add1, slow, island="w0")                  # a dependant on another island
    indep = rt.call(functools.partial(fns.sleep_then, seconds=1.0), np.float32(3), island="w0")
    time.sleep(0.5)
    pid = rt.island_info("w1")["pid"]
    os.kill(pid, signal.SIGKILL)
    t_kill = time.perf_counter()
    e = slow.exception(timeout=30)
    detect_s = time.perf_counter() - t_kill
    assert isinstance(e, IslandLost) and e.island == "w1" and "'w1' was lost" in str(e)
    assert detect_s < 5.0
    assert queued.exception(timeout=30) is e and cross.exception(timeout=30) is e
    assert float(indep.result(timeout=60)) == 3.0                   # other islands continue
    later = rt.call(fns.add1, np.float32(0), island="w1")
    assert later.exception(timeout=5) is e                         # later work fails at once
    t = rt.transfer(before, island="w0")                            # its value died with it
    assert t.exception(timeout=5) is e
    assert rt.alive_islands() == ["w0"]
    assert float(rt.call(fns.times3, np.float32(2), island="w0").result(timeout=60)) == 6.0

    info = rt.replace_island("w1")
    assert info["pid"] != pid and rt.alive_islands(check=True) == ["w0", "w1"]
    assert float(rt.call(fns.add1, np.float32(41), island="w1").result(timeout=60)) == 42.0
    x = rt.call(fns.add1, np.float32(1), island="w0")
    assert float(rt.call(fns.add, x, x, island="w1").result(timeout=60)) == 4.0
    stale = rt.call(fns.add1, before, island="w1")                # a generation-0 value
    assert stale.exception(timeout=5) is e

    assert [(m.event, m.generation) for m in rt.membership if m.island == "w1"] == \
        [("joined", 0), ("lost", 0), ("joined", 1)]
    kinds = [ev.kind for ev in rt.trace.events() if ev.island == "w1"]
    assert kinds.count("island_lost") == 1 and kinds.count("island_joined") == 2
    path = rt.trace.write(tmp_path / "trace.json")
    marks = [ev for ev in json.load(open(path))["traceEvents"] if ev.get("cat") == "membership"]
    assert {ev["name"] for ev in marks} >= {"w1 lost", "w1 joined"}
    assert os.path.getsize(rt.trace.plot(tmp_path / "trace.png")) > 1000


def test_dead_idle_island_is_found_by_a_ping_and_replace_needs_force_when_alive(rt):
    rt.alive_islands(check=True)
    with pytest.raises(ValueError, match="island 'w0' is alive"):
        rt.replace_island("w0")
    with pytest.raises(ValueError, match="unknown island 'nope'"):
        rt.replace_island("nope")
    pid = rt.island_info("w0")["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while "w0" in rt.alive_islands(check=True) and time.time() < deadline:
        time.sleep(0.1)
    assert "w0" not in rt.alive_islands()
    rt.replace_island("w0")
    assert float(rt.call(fns.add1, np.float32(1), island="w0").result(timeout=60)) == 2.0
    assert rt.alive_islands(check=True) == ["w0", "w1"]


def test_more_islands_than_resources_fail_clearly_without_hanging(ray_cluster):
    t0 = time.perf_counter()
    with pytest.raises(IslandStartError, match=r"need 10 CPUs.*cluster has 4"):
        RayRuntime([RayIsland(f"i{k}", num_cpus=2) for k in range(5)])
    with pytest.raises(IslandStartError, match=r"did not start within 3 s"):
        RayRuntime([RayIsland("x", num_cpus=0.5, resources=(("no_such_accelerator", 1),))],
                   start_timeout_s=3)
    assert time.perf_counter() - t0 < 30


CONTROLLER = '''
import os, signal, sys
import numpy as np, ray
from pathways_lite.checkpoint import Checkpointer, SavePolicy
from pathways_lite.ray_islands import RayIsland, RayRuntime
from tests.ray import fns
ray.init(address=sys.argv[1])
rt = RayRuntime([RayIsland("c0", num_cpus=0.5)], name="crashy")
ck = Checkpointer(sys.argv[2], SavePolicy(every_steps=1, async_save=False))
x = rt.transfer(np.zeros(4, np.float32), island="c0")
for step in range(1, 100):
    x = rt.call(fns.add1, x, island="c0")
    ck.save(step, {"x": x.result()}, {"pid": rt.island_info("c0")["pid"]})
    if step == 3:
        os.kill(os.getpid(), signal.SIGKILL)      # the controller crashes; its islands live on
'''


def test_controller_crash_resumes_from_its_checkpoint_with_the_same_islands(ray_cluster, tmp_path):
    import subprocess
    import sys
    from pathways_lite.checkpoint import Checkpointer
    from pathways_lite.ray_islands import _repo_pythonpath
    script = tmp_path / "controller.py"
    script.write_text(CONTROLLER)
    env = {**os.environ, "PYTHONPATH": _repo_pythonpath(), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(script), ray_cluster.get_runtime_context().gcs_address,
                           str(tmp_path / "ckpt")], env=env, timeout=240, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ck = Checkpointer(tmp_path / "ckpt")
    step, arrays, meta = ck.restore({"x": np.zeros(4, np.float32)})
    ck.close()
    assert step == 3 and meta["pid"] > 0
    pid = meta["pid"]
    with RayRuntime([RayIsland("c0", num_cpus=0.5)], name="crashy") as rt:   # the new controller
        assert rt.island_info("c0")["pid"] == pid                          # the same island
        assert "attached" in rt.membership[0].reason
        x = rt.transfer(np.asarray(arrays["x"]), island="c0")
        for _ in range(step, 6):
            x = rt.call(fns.add1, x, island="c0")
        np.testing.assert_array_equal(x.result(timeout=60), np.full(4, 6.0, np.float32))
