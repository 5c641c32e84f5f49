"""Functions the Ray tests send to islands (module level: shipped by reference, cached by jit)."""
import time

import jax
import jax.numpy as jnp
import numpy as np

from pathways_lite.islands import GANG_AXIS


def add1(x):
    return x + 1


def add(x, y):
    return x + y


def times3(x):
    return x * 3


def mat(x):
    return jnp.tanh(x @ x) + 1.0


def fail_on_negative(x):
    return jax.lax.cond(jnp.all(x >= 0), lambda v: v, lambda v: v * jnp.nan, x)


def bad_shapes(x):
    return x @ jnp.ones((7, 7), x.dtype)      # raises while tracing for x of another shape


def _sleep_host(seconds):
    time.sleep(float(seconds))
    return np.float32(seconds)


def sleep_then(x, seconds=1.0):
    """x + 0 after sleeping ``seconds`` on the island (a slow computation, for timing tests)."""
    s = jax.pure_callback(_sleep_host, jax.ShapeDtypeStruct((), jnp.float32), jnp.float32(seconds))
    return x + 0 * s


def allreduce_add(x):
    return jax.lax.psum(x, GANG_AXIS) + 1.0


def allreduce_pair(x, y):
    return {"sum": jax.lax.psum(x * y, GANG_AXIS), "mine": x - y}


def make_zeros():
    return jnp.zeros((3,), jnp.float32)


def _raise_host(x):
    raise ValueError("boom from the island")


def boom(x):
    """Fails while running on the island (not while tracing)."""
    return jax.pure_callback(_raise_host, jax.ShapeDtypeStruct(x.shape, x.dtype), x)


def slow_identity(tree, seconds=3.0):
    """``tree`` unchanged, after ``seconds`` on the island (to catch a computation in flight)."""
    s = jax.pure_callback(_sleep_host, jax.ShapeDtypeStruct((), jnp.float32), jnp.float32(seconds))
    return jax.tree_util.tree_map(lambda x: x + (0 * s).astype(x.dtype), tree)


def cross_process_sum(x):
    """psum over every device of the process group (all processes of a multi-host island)."""
    from jax.sharding import Mesh, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ("data",))
    body = jax.shard_map(lambda b: jax.lax.psum(jnp.sum(b), "data"), mesh=mesh, in_specs=P("data"),
                         out_specs=P())
    return body(x)
