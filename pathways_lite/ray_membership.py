"""Island membership of the Ray backend: start-up, loss, replacement (a mixin of RayRuntime).

An island's actor is started with :meth:`_spawn` (a named, detached actor when
the runtime has a ``name``, so a restarted controller attaches to it), waited
for with a timeout (:class:`IslandStartError` names what is missing), marked
lost the first time any of its work reports the actor dead (:meth:`_lose`:
one :class:`IslandLost` per actor generation, a ``lost`` membership event) and
replaced by a fresh actor of the next generation (:meth:`replace_island`).
"""
from __future__ import annotations

import functools
import logging
import time

from pathways_lite.ray_actor import IslandActor
from pathways_lite.ray_engine import Membership
from pathways_lite.ray_islands import IslandLost, IslandStartError

log = logging.getLogger("pathways_lite.ray_runtime")
NAMESPACE = "pathways_lite"


@functools.lru_cache(maxsize=None)
def _actor_class():
    import ray
    return ray.remote(IslandActor)


class MembershipMixin:
    """Island start-up, loss and replacement for RayRuntime (uses its ``_st``, ``_lock``, engine)."""

    def island_info(self, name) -> dict:
        """The current actor of ``name``: pid, host, platform, devices, jax version."""
        return dict(self._st[self.island(name).name].info)

    def alive_islands(self, check: bool = False, timeout_s: float = 10.0) -> list[str]:
        """Islands not known lost; ``check=True`` pings them first (a dead one is marked lost)."""
        import ray
        if check:
            refs = {n: st.actor.ping.remote() for n, st in self._st.items() if st.alive}
            ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
            for n, r in refs.items():
                try:
                    ray.get(r, timeout=0)
                except ray.exceptions.GetTimeoutError:
                    log.warning("island %r did not answer a ping within %.1f s", n, timeout_s)
                except ray.exceptions.RayActorError as e:
                    self._lose(n, self._st[n].gen, _brief(e))
        return [n for n, st in self._st.items() if st.alive]

    def on_membership(self, fn) -> None:
        """Call ``fn(Membership)`` on every island loss or join (from the thread that saw it)."""
        self._listeners.append(fn)

    def replace_island(self, name, *, force: bool = False, timeout_s: float | None = None) -> dict:
        """Start a fresh actor for lost island ``name`` (its store is empty); returns its info."""
        import ray
        st = self._st.get(name)
        if st is None:
            raise ValueError(self._unknown(name))
        if self._closed:
            raise RuntimeError("RayRuntime.replace_island: the runtime is shut down")
        with self._lock:
            if st.alive and not force:
                raise ValueError(f"replace_island: island {name!r} is alive; it replaces lost islands "
                                 "(force=True kills the live one first)")
            if st.alive:
                self._lose(name, st.gen, "replaced (replace_island force=True)")
            old = st.actor
        try:
            ray.kill(old, no_restart=True)
        except Exception:  # noqa: BLE001 - it is already gone
            pass
        if self._name:
            self._wait_name_free(name)
        started = {name: self._spawn(st.spec)}
        info = self._await_start(started, timeout_s)[name]
        with self._lock:
            st.actor, st.info = started[name][0], info
            st.gen += 1
            st.shipped = set()
            st.alive = True
            self._record(name, "joined", st.gen, "replacement")
        return dict(info)


    def _lose(self, name, gen, reason) -> IslandLost:
        with self._lock:
            st = self._st[name]
            exc = st.lost.get(gen)
            if exc is None:
                exc = st.lost[gen] = IslandLost(name, gen, reason)
            if gen == st.gen and st.alive:
                st.alive = False
                self._record(name, "lost", gen, reason)
        return exc

    def _lost(self, st, gen) -> IslandLost:
        return st.lost.get(gen) or self._lose(st.name, gen, "lost earlier")

    def _record(self, name, event, gen, reason):
        m = Membership(self.now(), name, event, gen, reason)
        self.membership.append(m)
        if self.trace is not None:
            self.trace.add_membership(m)
        (log.warning if event == "lost" else log.info)("pathways_lite.ray: island %r %s (gen %d): %s",
                                                        name, event, gen, reason)
        for fn in list(self._listeners):
            try:
                fn(m)
            except Exception:  # noqa: BLE001 - a listener must not break the runtime
                log.exception("membership listener %r failed", fn)


    # -- start-up ------------------------------------------------------------------------------
    def _check_resources(self, specs):
        import ray
        total = ray.cluster_resources()
        for res, field in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
            need = sum(getattr(s, field) for s in specs)
            have = total.get(res, 0.0)
            if need > have + 1e-9:
                raise IslandStartError(
                    f"{len(specs)} islands need {need:g} {res}s in all (RayIsland.{field} / config field "
                    f"runtime.island_{field}: {[getattr(s, field) for s in specs]}) but the Ray cluster has "
                    f"{have:g}; use fewer islands, lower runtime.island_{field} or add nodes")

    def _spawn(self, spec):
        env = dict(self._runtime_env or {})
        env["env_vars"] = {**self._cache_env, **spec.actor_env(self._pythonpath), **env.get("env_vars", {})}
        opts = dict(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, max_restarts=0, runtime_env=env)
        if spec.resources:
            opts["resources"] = dict(spec.resources)
        if self._name:   # detached and named: a restarted controller attaches to the same actor
            opts.update(name=f"{self._name}.{spec.name}", namespace=NAMESPACE, lifetime="detached",
                        get_if_exists=True)
        actor = _actor_class().options(**opts).remote(spec.name, spec.devices, tuple(spec.mesh_axes),
                                                      spec.mesh_shape)
        return actor, actor.attach.remote()

    def _wait_name_free(self, island, timeout_s=15.0):
        """After killing a named island actor: wait until Ray released its name."""
        import ray
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                ray.get_actor(f"{self._name}.{island}", namespace=NAMESPACE)
            except ValueError:
                return
            time.sleep(0.1)

    def _await_start(self, started, timeout_s=None):
        import ray
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        refs = {r: n for n, (_, r) in started.items()}
        ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        if not_ready:
            for _, (a, _) in started.items():
                ray.kill(a, no_restart=True)
            late = sorted(refs[r] for r in not_ready)
            raise IslandStartError(
                f"islands {late} did not start within {timeout_s:g} s (runtime.start_timeout_s); Ray "
                f"resources available now: {ray.available_resources()}; each island asks "
                f"{ {n: (self._st[n].spec.num_cpus, self._st[n].spec.num_gpus) for n in late} } (CPUs, GPUs)")
        infos = {}
        for r, n in refs.items():
            try:
                infos[n] = ray.get(r)
            except Exception as e:
                for _, (a, _) in started.items():
                    ray.kill(a, no_restart=True)
                raise IslandStartError(f"island {n!r} failed to start: {e}") from e
        return infos

    def _kill_all(self):
        import ray
        for st in self._st.values() if hasattr(self, "_st") else ():
            if st.actor is not None:
                try:
                    ray.kill(st.actor, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
                st.alive = False


def _brief(e) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__
