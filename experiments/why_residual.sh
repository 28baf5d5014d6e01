#!/bin/bash
# Why residual nets train with SGD: the whole CPU experiment on Fashion-MNIST, offline, in order:
#   1. configs/sweeps/why_residual_fashion_mnist.py: plain nets and ResNets of depth 20 and 56,
#      recording sharpness, gradient noise scale and gradient flow, and its plots;
#   2. the loss landscape of each of its 4 runs (21x21 surface on 256 training images), and plain
#      beside residual at depth 20 and at depth 56 (compare.png);
#   3. configs/sweeps/lr_depth_fashion_mnist.py: the lr x depth trainability map, and its plots;
#   4. configs/sweeps/edge_of_stability_fashion_mnist.py: full-batch gradient descent on 2,000
#      images, plain and residual ResNet-20 at two lrs, sharpness against 2/lr, and its plots;
#      then experiments/eos_check.py at each of the last three checkpoints of each run
#      (eos_check.jsonl);
#   5. configs/sweeps/trained_landscapes_fashion_mnist.py: plain-56 and ResNet-56 trained to a low
#      training loss on 1,000 images, their landscapes side by side (compare.png), and how convex
#      each is (experiments/landscape_numbers.py: landscape_numbers.jsonl).
# Usage: bash experiments/why_residual.sh OUT_DIR [RUNS_DIR] [PARTS]
# PARTS (default "1 2 3 4 5") picks the parts: `... OUT_DIR runs "1 2"` runs the first two.
# runs in RUNS_DIR (default runs/, where the configs' own commands run them) and copies the small
# result files (csv, md, png, npz; no checkpoints) to OUT_DIR/<the sweep's name>. Run it again to resume: the sweeps skip their finished points,
# a run's landscape is kept once computed. Both sweeps share a persistent compilation cache
# (RUNS_DIR/xla_cache unless JAX_COMPILATION_CACHE_DIR says otherwise).
# Measured in parts on the 2-core AMD CPU while other jobs shared it: the first sweep 16 minutes,
# each landscape 50-170 s, the map 25 minutes (an estimated 10-15 idle); about 45 minutes in all.
# Part 4 alone: the sweep 31.5 minutes (two points at a time), the twelve checks about 15-20
# minutes (150-175 s each when two ran at once). Part 5 alone, idle: about 21 minutes (the two
# runs 11, each landscape 105-110 s, the numbers 5.7 minutes).
set -eu -o pipefail
usage="usage: bash experiments/why_residual.sh OUT_DIR [RUNS_DIR] [PARTS]"
out=${1:?$usage}
runs=${2:-runs}
parts=" ${3:-1 2 3 4 5} "
# Whether part $1 is to run.
want() {
  [[ $parts == *" $1 "* ]]
}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$runs/xla_cache}
why=$runs/why_residual_fashion_mnist
map=$runs/lr_depth_fashion_mnist
eos=$runs/edge_of_stability_fashion_mnist
trained=$runs/trained_landscapes_fashion_mnist

# Copies the csv, md, png and npz files under directory $1 (not its checkpoints or TensorBoard
# events) into directory $2, keeping their paths relative to $1.
copy_results() {
  mkdir -p "$2"
  local dest
  dest=$(cd "$2" && pwd)
  (cd "$1" && find . \( -name checkpoints -o -name tensorboard \) -prune -o -type f \
      \( -name '*.csv' -o -name '*.md' -o -name '*.png' -o -name '*.npz' \) -print0 \
      | xargs -0 --no-run-if-empty cp --parents -t "$dest")
}

# Runs the sweep configs/sweeps/$1.py in directory $2 (printing the last $3 lines of its table),
# plots it, and copies its results into $out/$1.
sweep_and_plot() {
  python -m resnet_jax.sweep --config="configs/sweeps/$1.py" --workdir="$2" --pack=processes:2 2>&1 \
      | tail -"$3"
  python -m resnet_jax.sweep --workdir="$2" --plot 2>&1 | grep '^wrote'
  copy_results "$2" "$out/$1"
}

python -m resnet_jax.prepare fashion_mnist 2>&1 | tail -1

if want 1; then
  echo "== 1. configs/sweeps/why_residual_fashion_mnist.py ($SECONDS s so far)"
  sweep_and_plot why_residual_fashion_mnist "$why" 6
fi

if want 2; then
  echo "== 2. loss landscapes ($SECONDS s so far)"
  for depth in 20 56; do
    for skip in false true; do
      run=$why/depth=$depth,skip=$skip
      if [[ ! -f $run/landscape/landscape.npz ]]; then
        python -m resnet_jax.landscape --workdir="$run" --grid=21 --examples=256 2>&1 | tail -1
      fi
    done
    # --compare is a comma-separated list (read as CSV) and the runs' names hold commas.
    python -m resnet_jax.landscape --out="$why/compare_depth=$depth" \
        --compare="\"$why/depth=$depth,skip=false\",\"$why/depth=$depth,skip=true\"" 2>&1 | tail -1
  done
  copy_results "$why" "$out/why_residual_fashion_mnist"
fi

if want 3; then
  echo "== 3. configs/sweeps/lr_depth_fashion_mnist.py ($SECONDS s so far)"
  sweep_and_plot lr_depth_fashion_mnist "$map" 22
fi

if want 4; then
  echo "== 4. configs/sweeps/edge_of_stability_fashion_mnist.py ($SECONDS s so far)"
  sweep_and_plot edge_of_stability_fashion_mnist "$eos" 6
  if [[ ! -f $eos/eos_check.jsonl ]]; then
    rm -f "$eos/eos_check.jsonl.part"  # An interrupted pass's lines: checked again.
    for run in "$eos"/lr=*; do
      for checkpoint in "$run"/checkpoints/[0-9]*; do  # The last three the run kept.
        python experiments/eos_check.py --workdir="$run" --step="${checkpoint##*/}" --iters=12 \
            --out="$eos/eos_check.jsonl.part" | tail -1 | cut -c1-200
      done
    done
    mv "$eos/eos_check.jsonl.part" "$eos/eos_check.jsonl"
  fi
  cp "$eos/eos_check.jsonl" "$out/edge_of_stability_fashion_mnist/"
fi

if want 5; then
  echo "== 5. configs/sweeps/trained_landscapes_fashion_mnist.py ($SECONDS s so far)"
  python -m resnet_jax.sweep --config=configs/sweeps/trained_landscapes_fashion_mnist.py \
      --workdir="$trained" --pack=processes:2 2>&1 | tail -4
  for skip in false true; do
    if [[ ! -f $trained/skip=$skip/landscape/landscape.npz ]]; then
      python -m resnet_jax.landscape --workdir="$trained/skip=$skip" --grid=21 --examples=256 \
          2>&1 | tail -1
    fi
  done
  python -m resnet_jax.landscape --out="$trained" \
      --compare="$trained/skip=false,$trained/skip=true" 2>&1 | tail -1
  if [[ ! -f $trained/landscape_numbers.jsonl ]]; then
    python experiments/landscape_numbers.py --workdir="$trained/skip=false" \
        --workdir="$trained/skip=true" --out="$trained/landscape_numbers.jsonl.part" | cut -c1-200
    mv "$trained/landscape_numbers.jsonl.part" "$trained/landscape_numbers.jsonl"
  fi
  copy_results "$trained" "$out/trained_landscapes_fashion_mnist"
  cp "$trained/landscape_numbers.jsonl" "$out/trained_landscapes_fashion_mnist/"
fi
echo "== done in $SECONDS s: $out"
