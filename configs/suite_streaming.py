"""Suite 5, Streaming DiLoCo: fragments x overlap x merge x wire precision (Douillard et al. 2025, arXiv 2501.18512).

A 4-layer model (CPU scale) so fragments are groups of layers: DiLoCo as the
reference; streaming with 2 strided fragment groups (+ the embedding
fragment), tau=0 and alpha=0; sequential groups; 4 groups; overlap tau=5 with
alpha 0.5; then the same (tau=5, alpha 0.5) with the outer gradients sent as
bf16, fp8 and 4-bit (int4 with per-block scales), summed in f32.

Command:
  python launch/reproduce.py --suite=streaming --workdir=runs/suite_streaming [--scale=gpu]
Expected time: CPU (2 shared cores) 6-12 min for the 8 runs (597 s measured at load 9-13).
Expected ordering (paper): streaming ~ DiLoCo in loss with a peak bandwidth per
sync of about 1/(fragments) of DiLoCo's; overlap with alpha=0.5 costs little;
bf16/fp8/4-bit outer gradients cost almost nothing in loss while cutting bytes 2x/4x/~7x.
Observed on CPU (final val loss, peak bytes per sync): DiLoCo 1.957, 3.68 MB;
2 strided groups 1.984, 1.71 MB; sequential 1.982; 4 groups 1.987, 0.85 MB;
tau=5 alpha=0.5: fp32 1.917, bf16 1.917 (0.85 MB), fp8 1.917 (0.43 MB), int4 1.915
(0.23 MB). All within 0.07; 4-bit costs nothing; peak bytes fall as expected.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # loaded by path
from configs import suite_base  # noqa: E402


EXPECTED = ("loss: diloco ~ streaming variants (small differences), 4-bit ~ fp32; peak bytes "
            "per sync: diloco > 2 groups > 4 groups, and fp32 > bf16 > fp8 > int4")
COLUMNS = (("peak bytes/sync", "peak_sync_bytes"), ("syncs", "syncs"))


def get_config(scale="cpu"):
  c = suite_base.get_config(scale)
  c.name = "suite_streaming"
  if scale == "cpu":
    c.model.update(num_layers=4)
  else:
    c.model.update(num_layers=8)
  c.outer.update(fragment_pattern="strided")
  return c


def get_runs(scale="cpu"):
  s = {"outer.algorithm": "streaming"}
  ov = {**s, "outer.num_fragments": 2, "outer.overlap_tau": 5, "outer.merge_alpha": 0.5}
  return [
      ("diloco", {"outer.algorithm": "diloco"}),
      ("stream_p2", {**s, "outer.num_fragments": 2}),
      ("stream_p2_seq", {**s, "outer.num_fragments": 2, "outer.fragment_pattern": "sequential"}),
      ("stream_p4", {**s, "outer.num_fragments": 4}),
      ("stream_p2_tau5_a05", ov),
      ("stream_p2_tau5_a05_bf16", {**ov, "outer.wire_dtype": "bf16"}),
      ("stream_p2_tau5_a05_fp8", {**ov, "outer.wire_dtype": "fp8"}),
      ("stream_p2_tau5_a05_int4", {**ov, "outer.wire_dtype": "int4"}),
  ]
