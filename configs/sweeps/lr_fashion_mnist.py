"""A learning-rate sweep of the offline default, configs/fashion_mnist.py: 4 peak lrs on a CPU.

Command (prepare once: python -m resnet_jax.prepare fashion_mnist):
  python -m resnet_jax.sweep --config=configs/sweeps/lr_fashion_mnist.py \
      --workdir=runs/lr_fashion_mnist --pack=auto
and every packing mode side by side, shortened (issue #11):
  python experiments/pack_bench.py --sweep=configs/sweeps/lr_fashion_mnist.py \
      --modes=separate,off,processes:2,population:4 --num_steps=30 --log_every=10 \
      --fixed='{"dataset": {"eval_split": "test[:1000]"}}' \
      --json_out=experiments/results/pack_cpu.jsonl
4 runs of configs/fashion_mnist.py (ResNet-20, 400 steps at batch 128, 20 warmup steps and
cosine decay, momentum 0.9) that differ only in the peak lr: 0.05, 0.1 (the config's), 0.2 and
0.4. The lr is an input of the compiled step, so the points can share one compiled program.
Expect: the full sweep is not yet measured; one point alone trains about 430 s on the idle
2-core AMD CPU (84.57% test accuracy at lr 0.1), so about half an hour. Shortened to 30 steps by
the benchmark above (measured on that CPU, load average 1.6 to 4.1): 253 s one process and one
compilation per point (the baseline), 170 s with --pack=off (one process, each program compiled
once), 262 s with processes:2, 631 s with population:4 (vmapped convolutions are 4x slower on a
CPU); --pack=auto is off on a CPU. Test errors after 30 steps 59.7, 53.6, 77.2, 89.6% in every
mode but population (66.8, 59.1, 82.6, 89.3%: rounding differences grow with every step).
"""

import ml_collections

from resnet_jax import points


def get_config():
  return ml_collections.ConfigDict({
      "base": "configs/fashion_mnist.py",
      "points": points.axis("lr", [0.05, 0.1, 0.2, 0.4]),
  })
