#!/usr/bin/env bash
# The README's GPU figures, each as one named measurement; run the ones you name.
#
#   bash launch/gpu_figures.sh --list                        # names, GPUs needed, commands
#   bash launch/gpu_figures.sh OUT checkpoint runtime        # one H100: JSON under OUT/
#   bash launch/gpu_figures.sh OUT diloco_steps runtime      # two GPUs
#
# Each measurement runs in its own process under `timeout` (FIGURE_TIMEOUT_S,
# default 540 s): one that fails or runs over is reported and the next one
# still runs. Its JSON and log go to OUT/<name>.json and OUT/<name>.log; the
# exit status is the number of measurements that failed. Every process pays
# jax's start-up and compiles (about a minute on a GPU machine), so put the
# measurements of one machine into one call. FIGURE_ARGS is appended to every
# command (e.g. FIGURE_ARGS=--quick for a smoke test of `runtime` on a CPU;
# FIGURE_ARGS=--runs=one_island,diloco to split scaleout_x4 over two device calls,
# each under the 10-minute limit: its JSON is also written after every run).
# NCCL's NVLink SHARP stays off.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

# name | GPUs | arguments after "$PY" (OUT/<name>.json is appended as --out=...; @OUT
# stands for the OUT folder: a measurement's trace, run folders or profile go there)
FIGURES='
checkpoint|1|launch/bench_checkpoint.py --config=configs/lm_125m.py --steps=300 --every=50 --repeats=2
runtime|1|launch/bench_runtime.py --trace_dir=@OUT/runtime_trace
train_125m|1|launch/bench_train.py --config=configs/lm_125m.py --impls=xla,cudnn,pallas
train_125m_2048|1|launch/bench_train.py --config=configs/lm_125m.py --config.data.seq_len=2048 --config.model.max_seq_len=2048 --impls=cudnn,xla --batch_sizes=8,16,32 --remats=none,dots --steps=6 --warmup=2 --max_seconds=470
train_125m_2048_pallas|1|launch/bench_train.py --config=configs/lm_125m.py --config.data.seq_len=2048 --config.model.max_seq_len=2048 --impls=pallas --batch_sizes=32 --remats=none --steps=6 --warmup=2
train_350m_sweep|1|launch/bench_train.py --config=configs/lm_350m.py --impls=cudnn,xla --batch_sizes=8,16,32 --remats=none,dots --steps=5 --warmup=2 --max_seconds=470
train_350m_pallas|1|launch/bench_train.py --config=configs/lm_350m.py --impls=pallas --batch_sizes=32 --remats=none --steps=5 --warmup=2
train_350m|1|launch/bench_train.py --config=configs/lm_350m.py --impls=cudnn,pallas,xla --batch_sizes=16 --remats=none --compare_runtime
train_1b|1|launch/bench_train.py --config=configs/lm_1b.py --impls=cudnn,pallas,xla --batch_sizes=8 --remats=none,dots
attention|1|launch/bench_attention.py --budget_s=500
embedding|1|launch/bench_embedding.py
inner_step|1|launch/bench_inner_step.py --config=configs/lm_125m.py --inner_steps=30 --driver --profile_dir=@OUT/inner_step_profile
diloco_steps|2|launch/bench_diloco.py --config=configs/lm_125m.py --workers=1,2 --inner_steps=100 --outer_steps=3 --warmup_outer=3 --inner_loop=steps
diloco_scan|2|launch/bench_diloco.py --config=configs/lm_125m.py --workers=1,2 --inner_steps=100 --outer_steps=3 --warmup_outer=4 --inner_loop=scan
collectives|2|launch/bench_collectives.py
scaleout_x4|4|launch/bench_scaleout.py --config=configs/scaleout.py:x4 --warmup_outer=3 --workdir=@OUT/scaleout_x4_runs
'

if [[ $# -eq 0 || $1 == --list || $1 == -h ]]; then
  echo "usage: bash launch/gpu_figures.sh OUT NAME [NAME...]"
  echo "$FIGURES" | awk -F'|' 'NF == 3 {printf "  %-17s %s GPU(s)  %s\n", $1, $2, $3}'
  exit 0
fi
out=$1; shift
[[ $# -gt 0 ]] || { echo "gpu_figures.sh: name at least one measurement (--list shows them)" >&2; exit 2; }
for name in "$@"; do   # every name checked before the first measurement starts
  grep -q "^$name|" <<<"$FIGURES" || {
    echo "gpu_figures.sh: unknown measurement '$name'; known: $(echo "$FIGURES" | awk -F'|' 'NF == 3 {printf "%s ", $1}')" >&2
    exit 2; }
done
mkdir -p "$out"
failed=0
for name in "$@"; do
  args=$(grep "^$name|" <<<"$FIGURES" | cut -d'|' -f3)
  args=${args//@OUT/$out}
  echo "== $name: $PY $args --out=$out/$name.json ${FIGURE_ARGS:-}"
  start=$(date +%s)
  # shellcheck disable=SC2086  # the arguments are words by design
  timeout "${FIGURE_TIMEOUT_S:-540}" "$PY" $args "--out=$out/$name.json" ${FIGURE_ARGS:-} >"$out/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s"
  if [[ -d $out/${name}_profile ]]; then   # jax.profiler's tree is deep: one archive instead
    tar czf "$out/${name}_profile.tgz" -C "$out" "${name}_profile" && rm -rf "${out:?}/${name}_profile"
  fi
  if [[ $rc -ne 0 ]]; then failed=$((failed + 1)); tail -n 15 "$out/$name.log"; fi
done
exit "$failed"
