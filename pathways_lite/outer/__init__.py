"""Outer loops on the runtime: ddp, local_sgd (FedAvg), diloco, streaming, eager, async_local_sgd.

    from pathways_lite import outer
    summary = outer.run(config, workdir)        # config.outer.algorithm picks the loop

Modules: config (OuterConfig, the `outer` config section), rules (pure update
rules), fragments (streaming fragments), inner (jitted inner phases), topology
(the run's islands and runtime), common (the run context: data, logging,
state), snapshot (that state to a checkpoint and back), one module per
algorithm, driver (the entry), report (plots and tables).
"""
from pathways_lite.outer.config import ALGORITHMS, OuterConfig

__all__ = ["ALGORITHMS", "OuterConfig", "run", "run_with_state"]


def run(config, workdir, devices=None) -> dict:
  """Runs config.outer.algorithm (see driver.py); returns the summary dict."""
  from pathways_lite.outer import driver  # lazy: configs/base.py imports this package
  return driver.run(config, workdir, devices)


def run_with_state(config, workdir, devices=None):
  """Like `run`, also returning the finished Run (its `.state`: final arrays + meta)."""
  from pathways_lite.outer import driver
  return driver.run_with_state(config, workdir, devices)
