"""Outer loops on the runtime: ddp, local_sgd (FedAvg), diloco, streaming, eager, async_local_sgd.

    from pathways_lite import outer
    summary = outer.run(config, workdir)        # config.outer.algorithm picks the loop

Modules: config (OuterConfig, the `outer` config section), rules (pure update
rules), fragments (streaming fragments), inner (jitted inner phases), common
(the run context: islands, runtime, data, logging, state), one module per
algorithm, run (the entry), report (plots and tables).
"""
from pathways_lite.outer.config import ALGORITHMS, OuterConfig
from pathways_lite.outer.run import run, run_with_state

__all__ = ["ALGORITHMS", "OuterConfig", "run", "run_with_state"]
