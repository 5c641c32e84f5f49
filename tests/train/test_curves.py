"""pathways_lite.curves: the same run with two attention implementations gives the same curve."""
import os

import numpy as np
import pytest

from pathways_lite import curves
from tests.data.small_corpus import make_small_corpus
from tests.train.helpers import small_config


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  source = make_small_corpus(tmp_path_factory.mktemp("src"))
  return small_config(source, str(tmp_path_factory.mktemp("cache")))


def test_pallas_attention_trains_like_xla(config, tmp_path):
  common = {"train.steps": 6, "train.log_every": 1, "train.eval_every": 0,
            "checkpoint.enabled": False}
  variants = {impl: common | {"model.attention_impl": impl} for impl in ("xla", "pallas")}
  result = curves.compare(config, variants, str(tmp_path))
  ref, got = np.array(result["curves"]["xla"]), np.array(result["curves"]["pallas"])
  assert len(ref) == 6 and ref[-1] < ref[0]  # it trained
  d = result["compare"]["pallas"]
  assert d["max_abs_diff"] == pytest.approx(np.max(np.abs(ref - got)))
  assert d["max_abs_diff"] < 1e-4  # f32 on CPU: only summation order differs
  assert os.path.getsize(result["png"]) > 10_000


def test_differences_and_the_noise_yardstick():
  ref = np.linspace(5, 2, 40)
  noisy = ref + 0.01 * np.sin(np.arange(40))
  assert curves.differences(ref, noisy)["max_abs_diff"] == pytest.approx(
      np.max(np.abs(0.01 * np.sin(np.arange(40)))))
  assert curves.differences(ref, ref + 0.5)["final_mean_diff"] == pytest.approx(0.5)
  diffs = {"yard": curves.differences(ref, noisy),
           "close": curves.differences(ref, ref + 0.012 * np.cos(np.arange(40))),
           "off": curves.differences(ref, ref + 0.05)}
  curves.judge(diffs, "yard", 2.0)
  assert diffs["close"]["within_noise"] and not diffs["off"]["within_noise"]
  assert "within_noise" not in diffs["yard"]


def test_bad_override_fails_before_any_run(config, tmp_path):
  with pytest.raises(ValueError, match="no field 'attention_kind'"):
    curves.compare(config, {"a": {}, "b": {"model.attention_kind": "x"}}, str(tmp_path))
  with pytest.raises(ValueError, match="variant 'b'.*attention_impl"):
    curves.compare(config, {"a": {}, "b": {"model.attention_impl": "flash"}}, str(tmp_path))
  assert not os.listdir(tmp_path)
