#!/bin/bash
# The GPU figures the README quotes, in one go, on one GPU with Fashion-MNIST's raw files present:
#   1. configs/fashion_mnist_gpu.py: ResNet-20, 15 epochs at batch 256, bf16 (test accuracy and
#      training seconds, compilation and evaluation excluded);
#   2. experiments/bench.py: ResNet-20 at batch 128 and 512, ResNet-50 at batch 256, bf16, JAX
#      and PyTorch side by side;
#   3. experiments/preemption_drill.py on configs/fashion_mnist_gpu.py: SIGTERM mid-run, the
#      exit code, the checkpointed step, seconds to stop, and a bitwise resume;
#   4. configs/sweeps/ablation_fashion_mnist_gpu.py with its plots;
#   5. configs/sweeps/lr_depth_fashion_mnist_gpu.py (the lr x depth trainability map) with its
#      plots;
#   6. configs/sweeps/why_residual_fashion_mnist_gpu.py (sharpness, noise scale, gradient flow)
#      with its plots and the plain-vs-residual loss landscapes at depths 110 and 20;
#   7. experiments/step_speed.py: issue #10's goals table (ResNet-20 b128/b512, ResNet-50 b256,
#      the configs/cifar10.py recipe end to end on synthetic pixels, compile cold and warm), each
#      method on and off (steps per call, XLA flag sets, BN variance, the compilation cache), a
#      profile of ResNet-20 b128, PyTorch eager and torch.compile; step_speed.jsonl and the table;
#   8. experiments/pack_bench.py: issue #11's 8-point lr sweep (configs/sweeps/
#      lr_fashion_mnist_gpu.py) packed as population:8, processes:4 and off, and as separate
#      processes compiling anew (as before packing); wall, compile and img/s per mode.
# Usage: bash experiments/gpu_figures.sh OUT_DIR [SECONDS] [PARTS]
# writes JSON lines and tarballs to OUT_DIR; each part is cut short so that the whole ends within
# SECONDS (default 540), since a GPU lease is short. PARTS (default "1 2 3 4 5 6 7 8") picks the
# parts, so that a lease too short for all of them can run parts on their own:
# `... OUT_DIR 480 5 6`. 6.2 minutes on one H100 (jax 0.11.2) without parts 3 and 5; parts 1-4
# took 7.1 minutes on one H200. Parts 5-8 are not yet measured (5 sized at about 4 minutes on one
# H100, capped at 270 s; 6 capped at 240 s for the sweep and 60 s per landscape; 7 capped at
# 360 s, a call of its own: `... OUT_DIR 400 7`, whose measurements past its 360 s are recorded
# as skipped; 8 capped at 360 s: `... OUT_DIR 400 8`). STEP_SPEED_TINY=1 shrinks part 7's
# cases to check its plumbing on a CPU (6 minutes on the 2-core AMD CPU, loaded);
# PACK_BENCH_TINY=1 does the same for part 8 (345 s there).
set -u
usage="usage: bash experiments/gpu_figures.sh OUT_DIR [SECONDS] [PARTS]"
out=${1:?$usage}
deadline=$((SECONDS + ${2:-540}))
parts=" ${3:-1 2 3 4 5 6 7 8} "
# Whether part $1 is to run.
want() {
  [[ $parts == *" $1 "* ]]
}
# The smaller of the cap $1 and the seconds left before the deadline (keeping 20 s to pack up).
limit() {
  local left=$((deadline - SECONDS - 20))
  echo $(( left < $1 ? (left > 1 ? left : 1) : $1 ))
}
mkdir -p "$out"
runs=$(mktemp -d)
# Runs configs/sweeps/$1.py in $runs/$2, at most $3 seconds, $4 points sharing the GPU at once
# (each with 1/($4 + 1) of its memory), printing the last $5 lines of its table; then its plots.
# The points share a compilation cache: those that differ only in the step's inputs compile once.
sweep() {
  local devices
  devices=$(printf '0,%.0s' $(seq "$4"))
  JAX_COMPILATION_CACHE_DIR="$runs/xla_cache" XLA_PYTHON_CLIENT_MEM_FRACTION=0.$((100 / ($4 + 1))) \
      timeout $(limit "$3") python -m resnet_jax.sweep --config="configs/sweeps/$1.py" \
      --workdir="$runs/$2" --pack=processes:"$4" --devices="${devices%,}" 2>&1 | tail -"$5"
  python -m resnet_jax.sweep --workdir="$runs/$2" --plot 2>&1 | tail -5
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

timeout $(limit 120) python -m resnet_jax.prepare fashion_mnist 2>&1 | tail -1

if want 1; then
echo "== 1. configs/fashion_mnist_gpu.py"
timeout $(limit 150) python -m resnet_jax.main --config=configs/fashion_mnist_gpu.py \
    --workdir="$runs/fashion_mnist_gpu" 2>&1 | tail -1
cp "$runs/fashion_mnist_gpu/metrics.jsonl" "$out/fashion_mnist_gpu_metrics.jsonl"
python - "$runs/fashion_mnist_gpu" <<'PY'
import json, os, sys
from resnet_jax import reporting
batch = json.load(open(os.path.join(sys.argv[1], reporting.CONFIG_FILE)))["batch_size"]
events = reporting.read_metrics(sys.argv[1])
train = [e for e in events if e["event"] == reporting.TRAIN]
seconds, last = 0.0, 0
for e in train:  # Each log window: its steps at its measured throughput.
  seconds += (e["step"] - last) * batch / e["img_per_s"]
  last = e["step"]
evals = [e for e in events if e["event"] == reporting.EVAL]
print(f"training {seconds:.1f} s for {last} steps ({last * batch / seconds:,.0f} img/s), "
      f"compile {train[0].get('compile_s')} s, final train error {train[-1]['train_error']:.4f}, "
      f"test accuracy {100 * (1 - evals[-1]['test_error']):.2f}%")
PY
fi

if want 2; then
echo "== 2. experiments/bench.py"
timeout $(limit 150) python experiments/bench.py --model=resnet20 --batch_size=128,512 \
    --dtype=bfloat16 --json_out="$out/bench.jsonl" 2>&1 | tail -6
timeout $(limit 150) python experiments/bench.py --model=resnet50 --batch_size=256 \
    --dtype=bfloat16 --image_size=224 --num_classes=1000 --json_out="$out/bench.jsonl" 2>&1 \
    | tail -4
fi

if want 3; then
echo "== 3. experiments/preemption_drill.py"
timeout $(limit 120) python experiments/preemption_drill.py --config=configs/fashion_mnist_gpu.py \
    --num_steps=1200 --signal_after=400 --json_out="$out/preemption_drill.jsonl" 2>&1 | tail -2
fi

if want 4; then
echo "== 4. configs/sweeps/ablation_fashion_mnist_gpu.py"
sweep ablation_fashion_mnist_gpu ablation 330 3 9
tar czf "$out/ablation.tgz" --exclude=checkpoints --exclude='events.*' -C "$runs" ablation
fi

if want 5; then
echo "== 5. configs/sweeps/lr_depth_fashion_mnist_gpu.py"
# 36 points, three at a time; with the compilation cache each depth and skip compiles once.
sweep lr_depth_fashion_mnist_gpu lr_depth 270 3 39
tar czf "$out/lr_depth.tgz" --exclude=checkpoints --exclude='events.*' -C "$runs" lr_depth
fi

if want 6; then
echo "== 6. configs/sweeps/why_residual_fashion_mnist_gpu.py"
why="$runs/why_residual"
sweep why_residual_fashion_mnist_gpu why_residual 240 4 7
for depth in 110 20; do
  for skip in false true; do
    timeout $(limit 60) python -m resnet_jax.landscape --workdir="$why/depth=$depth,skip=$skip" \
        2>&1 | tail -1
  done
  python -m resnet_jax.landscape --out="$why/compare_depth=$depth" \
      --compare="\"$why/depth=$depth,skip=false\",\"$why/depth=$depth,skip=true\"" 2>&1 | tail -1
done
tar czf "$out/why_residual.tgz" --exclude=checkpoints --exclude='events.*' -C "$runs" why_residual
fi

if want 7; then
echo "== 7. experiments/step_speed.py (issue #10; the recipe on synthetic CIFAR-10 pixels)"
part7_end=$((SECONDS + 360))
work="$runs/step_speed"
speed=(python experiments/step_speed.py --out="$out/step_speed.jsonl" --work_dir="$work"
       ${STEP_SPEED_TINY:+--tiny})
# Runs step_speed.py with the groups $2 for at most $1 s of part 7's 360 s (and of the whole
# deadline); it ends its own measurements in time (--budget_s), `timeout` is the backstop.
speed() {
  local cap=$(( $1 < part7_end - SECONDS ? $1 : part7_end - SECONDS ))
  if (( cap < 15 )); then echo "not run, part 7's time is spent: $2"; return; fi
  cap=$(limit "$cap")
  timeout $((cap + 20)) "${speed[@]}" --groups="$2" --budget_s="$cap" 2>&1 \
      | grep -v -e '^Generating' -e '^Shuffling' -e 'examples/s' -e '^Dataset cifar10'
}
# The recipe's data, on a CPU core while the GPU measures; one of 16 barely slows compiling.
"${speed[@]}" --synthetic_cifar10="$work/synthetic_cifar10" >"$runs/synthetic_cifar10.log" 2>&1 &
data=$!
speed 110 goals,warm
wait "$data" || tail -3 "$runs/synthetic_cifar10.log"
speed 130 recipe
speed 360 torch,steps_per_call,torch_compile,profile,xla_flags,model_args
(cd "$work" && find . -name perfetto_trace.json.gz | tar czf "$out/step_speed_traces.tgz" -T -)
python experiments/step_speed.py --table="$out/step_speed.jsonl"
fi

if want 8; then
echo "== 8. experiments/pack_bench.py (issue #11: an 8-point lr sweep in every packing mode)"
# configs/sweeps/lr_fashion_mnist_gpu.py at full length (8 points of 3510 steps): the modes
# that pack first, then the baseline (a process and a compilation per point), which is cut
# short, reported with the points it finished, where part 8's 360 s run out.
part8=$(limit 360)
tiny=()  # PACK_BENCH_TINY=1: tiny points, to check the plumbing on a CPU.
[[ -n ${PACK_BENCH_TINY:-} ]] && tiny=(--num_steps=4 --log_every=2 --fixed='{"batch_size": 16,
    "optimizer": {"warmup_steps": 1}, "model": {"width": 0.25, "dtype": "float32"},
    "dataset": {"eval_split": "test[:64]"}}')
timeout $((part8 + 30)) python experiments/pack_bench.py \
    --sweep=configs/sweeps/lr_fashion_mnist_gpu.py --modes=population:8,processes:4,off,separate \
    --mode_timeout=150 --max_seconds="$part8" --work_dir="$runs/pack" --keep \
    --json_out="$out/pack_gpu.jsonl" "${tiny[@]}" 2>&1 | tail -9
tar czf "$out/pack.tgz" --exclude=checkpoints --exclude='events.*' --exclude=xla_cache \
    --exclude=separate_caches -C "$runs" pack
fi
