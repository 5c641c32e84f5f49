"""Shared helpers for the runtime tests (8 fake CPU devices come from tests/conftest.py)."""
import jax.numpy as jnp
import pytest

from pathways_lite.islands import make_islands
from pathways_lite.network import Link, LinkModel
from pathways_lite.runtime import Runtime


# Module-level functions so jit caches are shared between tests.
def add1(x):
    return x + 1


def times3(x):
    return x * 3


def add(x, y):
    return x + y


def mat(x):
    return jnp.tanh(x @ x) + 1.0


@pytest.fixture
def islands4(devices):
    return make_islands(4, devices=devices)


@pytest.fixture
def rt4(islands4):
    with Runtime(islands4) as rt:
        yield rt


def slow_link_runtime(islands, latency=0.3, pair=("island0", "island1"), **kw):
    """A real-clock runtime whose `pair` link holds each transfer `latency` seconds."""
    return Runtime(islands, links=LinkModel(links={pair: Link(latency_s=latency)}), **kw)
