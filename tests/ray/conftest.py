"""One local Ray cluster per test module (actors are separate processes with their own JAX)."""
import warnings

import pytest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():
        ray.shutdown()
    with warnings.catch_warnings():   # Ray starts its daemons with fork+exec: harmless here
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 object_store_memory=512 * 1024 * 1024)
    yield ray
    ray.shutdown()
