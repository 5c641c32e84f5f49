"""launch/bench_embedding.py: the three embeddings on three token distributions, in one run."""
from tests import launchers


def test_model_embedding_sums_in_f32_where_the_bf16_table_stalls():
  bench = launchers.load("launch/bench_embedding.py")
  r = bench.measure(B=2, L=512, D=16, iters=1)
  keys = {f"{w}/{t}" for w in bench.WAYS for t in bench.TOKENS}
  assert set(r["ms"]) == set(r["rel_err"]) == keys
  assert all(v > 0 for v in r["ms"].values())
  for t in bench.TOKENS:
    assert r["rel_err"][f"model/{t}"] < 1e-6          # f32 sums of bf16 cotangents: exact here
    assert r["rel_err"][f"one_hot/{t}"] < 2e-2        # one bf16 rounding of each sum
  # 1024 repeats of one id: a bf16 running sum stops growing long before the exact sum
  assert r["rel_err"]["bf16_table/one_token"] > 0.5
  assert r["rel_err"]["bf16_table/corpus"] > r["rel_err"]["bf16_table/random"]
