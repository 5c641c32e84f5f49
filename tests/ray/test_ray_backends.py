"""Picking the backend by name, one island per TPU slice, and clear errors (no Ray cluster here)."""
import sys
import time
import types

import numpy as np
import pytest

from pathways_lite.islands import make_islands
from pathways_lite.ray_islands import (BACKENDS, RUNTIME_DEFAULTS, RayIsland, from_local,
                                       islands_from_slices, make_runtime, make_runtime_from_config)
from pathways_lite.runtime import Runtime
from tests.ray import fns


class FakeTpu:
    """Just what islands_from_slices and Mesh read from a device."""

    def __init__(self, id, slice_index):
        self.id, self.slice_index, self.platform = id, slice_index, "tpu"

    def __repr__(self):
        return f"FakeTpu({self.id}, slice={self.slice_index})"


def test_islands_from_slices_groups_by_slice_index():
    devs = [FakeTpu(i, s) for i, s in enumerate([1, 0, 1, 0, 0, 1, 1, 0])]
    isls = islands_from_slices(devs)
    assert [i.name for i in isls] == ["slice0", "slice1"]
    assert [d.id for d in isls[0].devices] == [1, 3, 4, 7]
    assert [d.id for d in isls[1].devices] == [0, 2, 5, 6]
    assert isls[0].mesh.devices.shape == (4,) and isls[0].mesh.axis_names == ("data",)
    assert [d.id for d in isls[1].mesh.devices.flat] == [0, 2, 5, 6]


def test_islands_from_slices_rejects_bad_input(devices):
    with pytest.raises(ValueError, match="different device counts"):
        islands_from_slices([FakeTpu(0, 0), FakeTpu(1, 0), FakeTpu(2, 1)])
    with pytest.raises(ValueError, match="slice_index=-1"):
        islands_from_slices([FakeTpu(0, -1)])
    with pytest.raises(ValueError, match="empty"):
        islands_from_slices([])
    one = islands_from_slices(devices)          # CPU devices have no slice_index: one slice
    assert len(one) == 1 and len(one[0].devices) == 8


def test_backend_by_name_and_bad_values(devices):
    with pytest.raises(ValueError, match=r"'runtime.backend'='tpu'.*\['local', 'ray', 'pathways'\]"):
        make_runtime("tpu")
    with make_runtime("local", num_islands=2, devices=devices) as rt:
        assert isinstance(rt, Runtime) and [i.name for i in rt.islands] == ["island0", "island1"]
        assert float(rt.call(fns.add1, np.float32(1), island="island1").result()) == 2.0
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['runtime.bogus'\]"):
        make_runtime_from_config({"backend": "local", "bogus": 1}, None)
    local = Runtime(make_islands(2, devices=devices))
    assert from_local({"backend": "local"}, local) is local
    with pytest.raises(ValueError, match="'runtime.backend'='gpu'"):
        from_local({"backend": "gpu"}, local)
    with pytest.raises(ValueError, match="runtime.island_devices"):
        from_local({"backend": "ray", "island_devices": 2}, local)
    local.shutdown()
    assert set(RUNTIME_DEFAULTS) >= {"backend", "ray_address"} and BACKENDS == ("local", "ray", "pathways")


def test_pathways_backend_initializes_pathwaysutils_only_when_chosen(devices, monkeypatch):
    if "pathwaysutils" not in sys.modules:
        monkeypatch.setitem(sys.modules, "pathwaysutils", None)    # import fails: not installed
        with pytest.raises(RuntimeError, match="needs the pathwaysutils package"):
            make_runtime("pathways")
    calls = []
    stub = types.ModuleType("pathwaysutils")
    stub.initialize = lambda: calls.append("init")
    monkeypatch.setitem(sys.modules, "pathwaysutils", stub)
    with make_runtime("local", num_islands=1, devices=devices):
        pass
    assert calls == []
    devs = [FakeTpu(i, i // 2) for i in range(6)]
    rt = make_runtime("pathways", devices=devs)
    assert calls == ["init"] and [i.name for i in rt.islands] == ["slice0", "slice1", "slice2"]
    rt.shutdown()


def test_unreachable_ray_address_fails_fast_and_clearly():
    import ray
    if ray.is_initialized():
        ray.shutdown()
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"runtime.ray_address='127.0.0.1:1'.*no Ray cluster"):
        make_runtime("ray", islands=["a"], ray_address="127.0.0.1:1")
    with pytest.raises(ValueError, match="must be 'HOST:PORT'"):
        make_runtime("ray", islands=["a"], ray_address="nonsense")
    assert time.perf_counter() - t0 < 15 and not ray.is_initialized()


def test_ray_island_validation():
    with pytest.raises(ValueError, match=r"RayIsland\('a'\).num_gpus must be a finite number >= 0"):
        RayIsland("a", num_gpus=-1)
    with pytest.raises(ValueError, match="mesh_shape"):
        RayIsland("a", devices=4, mesh_axes=("x", "y"), mesh_shape=(3, 2))
    env = RayIsland("a", devices=4).actor_env(None)
    assert env == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert "JAX_PLATFORMS" not in RayIsland("g", num_gpus=1).actor_env(None)


def test_server_island_gpus_override(devices):
    from pathways_lite.ray_backends import island_specs, runtime_config
    local = Runtime(make_islands(3, devices=devices, names=["worker0", "worker1", "server"]))
    specs = {s.name: s for s in island_specs(local, num_gpus=1.0, island_gpus={"server": 0.0})}
    assert [specs[n].num_gpus for n in ("worker0", "worker1", "server")] == [1.0, 1.0, 0.0]
    assert specs["server"].actor_env(None)["JAX_PLATFORMS"] == "cpu"  # the server is a CPU actor
    assert "JAX_PLATFORMS" not in specs["worker0"].actor_env(None)
    local.shutdown()
    assert runtime_config({"backend": "ray"})["server_num_gpus"] == -1.0
    for bad in (-0.5, float("inf"), "1", True):
        with pytest.raises(ValueError, match="'runtime.server_num_gpus' must be -1"):
            runtime_config({"backend": "ray", "server_num_gpus": bad})
