"""Sharding rules: specs follow the rules, and a sharded forward equals the unsharded one."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models import DecoderLM, ModelConfig
from models.sharding import (batch_partition_spec, make_mesh, param_partition_specs,
                             param_shardings, shard_params)


def cfg_and_params():
  cfg = dataclasses.replace(ModelConfig(), d_model=32, num_heads=4, num_kv_heads=2,
                            num_layers=1, max_seq_len=16, tie_embeddings=False)
  tokens = jax.random.randint(jax.random.key(1), (4, 8), 0, 256)
  return cfg, DecoderLM(cfg).init(jax.random.key(0), tokens)["params"], tokens


def test_specs_follow_rules_and_fit_the_mesh(devices):
  cfg, params, _ = cfg_and_params()
  specs = param_partition_specs(params, cfg)
  attn = specs["blocks_0"]["attn"]
  assert attn["q"]["kernel"] == P("fsdp", "tensor", None)  # heads on tensor
  assert attn["o"]["kernel"] == P("tensor", None, "fsdp")
  assert specs["blocks_0"]["mlp"]["down"]["kernel"] == P("tensor", "fsdp")
  assert specs["final_norm"]["scale"] == P(None)  # norms replicated
  assert specs["embed"]["embedding"] == P("tensor", "fsdp")
  mesh = make_mesh(devices, 2, 2, 2)
  fitted = param_partition_specs(params, cfg, mesh)
  assert fitted["embed"]["embedding"] == P(None, "fsdp")  # vocab 259 is odd: replicated
  assert fitted["lm_head"]["kernel"] == P("fsdp", None)
  assert batch_partition_spec() == P(("data", "fsdp"), None)
  with pytest.raises(ValueError, match="tie_embeddings"):
    param_partition_specs(params, dataclasses.replace(cfg, tie_embeddings=True))
  with pytest.raises(ValueError, match="no sharding rule"):
    param_partition_specs({**params, "extra": {"bias": jnp.zeros(3)}})


def test_sharded_forward_equals_unsharded(devices):
  cfg, params, tokens = cfg_and_params()
  model = DecoderLM(cfg)
  fwd = lambda p, t: model.apply({"params": p}, t)
  want = jax.jit(fwd)(params, tokens)
  mesh = make_mesh(devices, 2, 2, 2)
  sharded = shard_params(params, mesh, cfg)
  q_kernel = sharded["blocks_0"]["attn"]["q"]["kernel"]
  assert q_kernel.sharding.spec == P("fsdp", "tensor", None)
  assert len(q_kernel.addressable_shards) == 8
  assert q_kernel.addressable_shards[0].data.shape == (16, 2, 8)
  tok_sharding = NamedSharding(mesh, batch_partition_spec())
  got = jax.jit(fwd, in_shardings=(param_shardings(params, mesh, cfg), tok_sharding),
                out_shardings=NamedSharding(mesh, P(("data", "fsdp"), None, None)))(
                    sharded, jax.device_put(tokens, tok_sharding))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(want))))
