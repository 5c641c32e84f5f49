import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pathways_lite.islands import GANG_AXIS, Union, make_islands


@pytest.mark.parametrize("n,k", [(4, 2), (2, 4), (8, 1)])
def test_disjoint_split_covers_devices_in_order(devices, n, k):
    isls = make_islands(n, devices=devices)
    assert [i.name for i in isls] == [f"island{j}" for j in range(n)]
    assert [list(i.devices) for i in isls] == [devices[j * k:(j + 1) * k] for j in range(n)]
    for isl in isls:
        assert isl.mesh.axis_names == ("data",)
        assert list(isl.mesh.devices.flat) == list(isl.devices)
        assert isl.replicated().device_set == set(isl.devices)


def test_sharding_places_data_on_island(devices):
    isl = make_islands(2, devices=devices)[1]
    x = jax.device_put(np.arange(8.0), isl.sharding(P("data")))
    assert x.sharding.device_set == set(devices[4:])
    assert [s.data.shape for s in x.addressable_shards] == [(2,)] * 4
    np.testing.assert_array_equal(np.asarray(x), np.arange(8.0))


def test_virtual_islands_share_devices(devices):
    isls = make_islands(4, devices=devices[:1], virtual=True, names=list("abcd"))
    assert [i.name for i in isls] == list("abcd")
    assert all(i.devices == (devices[0],) and i.virtual for i in isls)
    assert Union(isls).mode == "stack"


def test_devices_per_island_and_mesh_shape(devices):
    isls = make_islands(2, devices=devices, devices_per_island=2)
    assert [len(i.devices) for i in isls] == [2, 2]
    isls = make_islands(2, devices=devices, mesh_axes=("data", "model"), mesh_shape=(2, 2))
    assert isls[0].mesh.devices.shape == (2, 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0), "positive int"),
    (dict(n=16), "need at least|need 16"),
    (dict(n=2, devices_per_island=5), "need 10 devices"),
    (dict(n=2, names=["a", "a"]), "distinct"),
    (dict(n=2, mesh_axes=("data", "model")), "mesh_shape"),
    (dict(n=2, mesh_axes=(GANG_AXIS,)), "other than"),
    (dict(n=2, mesh_shape=(3,)), "multiply"),
])
def test_bad_input_names_the_problem(devices, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_islands(devices=devices, **kwargs)


def test_sharding_rejects_unknown_axis(devices):
    isl = make_islands(2, devices=devices)[0]
    with pytest.raises(ValueError, match="axes are"):
        isl.sharding(P("model"))


def test_union_modes(devices):
    isls = make_islands(4, devices=devices)
    u = Union(isls[:2])
    assert u.mode == "mesh" and u.mesh.axis_names == (GANG_AXIS, "data")
    assert u.mesh.devices.shape == (2, 2)
    partly = make_islands(2, devices=devices[:3], devices_per_island=2, virtual=True)
    with pytest.raises(ValueError, match="distinct"):
        Union([isls[0], isls[0]])
    shifted = make_islands(1, devices=devices[1:3], names=["shifted"])
    with pytest.raises(ValueError, match="overlapping partly"):
        Union([isls[0], shifted[0]])
    assert Union(partly).mode == "stack"
