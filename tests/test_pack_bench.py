"""experiments/pack_bench.py's pure parts: the sweep copy it runs, the baseline's command line,
and the figures and table it makes of the points' records. Nothing here trains."""

from __future__ import annotations

import os

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from experiments import pack_bench
from resnet_jax import points, population


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _in_the_repository_root(monkeypatch):
  monkeypatch.chdir(REPO)  # Sweep files name their base config from there, as the bench does.


def _sweep(**fixed) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "base": "configs/fashion_mnist.py:width=0.5",
      "fixed": fixed,
      "points": points.product(points.axis("depth", [56]), points.axis("lr", [0.05, 0.4])),
  })


@pytest.mark.parametrize("name, lrs, base", [
    ("lr_fashion_mnist.py", (0.05, 0.1, 0.2, 0.4), "configs/fashion_mnist.py"),
    ("lr_fashion_mnist_gpu.py", (0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6),
     "configs/fashion_mnist_gpu.py"),
])
def test_the_lr_sweeps_points_differ_only_in_lr_so_they_train_as_one_population(name, lrs, base):
  sweep_config = points.load_get_config(f"configs/sweeps/{name}")()
  sweep = points.expand(sweep_config)

  assert sweep_config.base == base
  assert tuple(p.config.optimizer.lr for p in sweep) == lrs
  assert population.packing_errors([p.config for p in sweep]) == []
  with open(f"configs/sweeps/{name}") as f:
    assert f"--config=configs/sweeps/{name}" in f.read()


def test_the_written_sweep_file_loads_with_the_overrides_on_every_point(tmp_path):
  sweep = pack_bench.bench_sweep(
      points.load_get_config("configs/sweeps/lr_fashion_mnist_gpu.py")(), num_steps=300,
      log_every=10, fixed={"dataset": {"eval_split": "test[:1000]"}})
  path = str(tmp_path / "sweep.py")

  pack_bench.write_sweep_file(sweep, path, "configs/sweeps/lr_fashion_mnist_gpu.py")
  expanded = points.expand(points.load_get_config(path)())

  assert [p.name for p in expanded][:2] == ["lr=0.0125", "lr=0.025"]
  assert len(expanded) == 8
  for point in expanded:
    config = point.config
    assert (config.num_steps, config.num_epochs, config.log_every) == (300, 0, 10)
    assert (config.eval_every, config.checkpoint_every) == (0, 0)
    assert config.dataset.eval_split == "test[:1000]"
    assert config.model.dtype == "bfloat16"  # The base config's fields stand.


def test_overrides_merge_into_the_sweeps_nested_fixed_fields():
  sweep = pack_bench.bench_sweep(_sweep(optimizer={"nesterov": True}),
                                 fixed={"optimizer": {"warmup_steps": 5}})

  assert sweep.fixed.optimizer.to_dict() == {"nesterov": True, "warmup_steps": 5}
  assert "num_steps" not in sweep.fixed  # Without --num_steps the sweep's length stands.


def test_the_baselines_command_line_gives_each_point_its_sweep_config(monkeypatch):
  sweep = pack_bench.bench_sweep(_sweep(progress_bar=False), num_steps=30,
                                 fixed={"dataset": {"eval_split": "test[:1000]"}})
  point = points.expand(sweep)[1]

  command = pack_bench.main_command(sweep, point, "/tmp/w")
  # As resnet_jax.main parses them; config_flags reads the overrides from sys.argv.
  argv = ["main", *(a for a in command[3:] if not a.startswith("--workdir="))]
  monkeypatch.setattr("sys.argv", argv)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
  flag_values(argv)

  assert command[:3] == [pack_bench.sys.executable, "-m", "resnet_jax.main"]
  assert command[3] == "--config=configs/fashion_mnist.py:width=0.5,depth=56"
  assert flag_values.config.to_dict() == point.config.to_dict()
  assert point.config.optimizer.lr == 0.4


def _events(compile_s: float, windows: list[tuple[int, float, float]], test_error: float):
  """A run's metrics.jsonl events: train events at (step, img_per_s, wall_time_s), then eval."""
  events = [{"event": "train", "step": step, "img_per_s": speed, "wall_time_s": wall}
            for step, speed, wall in windows]
  events[0]["compile_s"] = compile_s
  return events + [{"event": "eval", "step": windows[-1][0], "test_error": test_error,
                    "wall_time_s": windows[-1][2] + 1.0}]


def test_points_one_after_another_add_their_training_seconds():
  # Batch 10: 20 steps in two windows of 1 s each, then an evaluation of 1 s.
  first = pack_bench.measure_point(_events(5.0, [(10, 100.0, 7.0), (20, 100.0, 8.0)], 0.2),
                                   10, written_at=1009.0,
                                   summary={"status": "completed", "test_error": 0.2})
  second = pack_bench.measure_point(_events(0.1, [(10, 50.0, 3.0), (20, 50.0, 5.0)], 0.3),
                                    10, written_at=1020.0,
                                    summary={"status": "completed", "test_error": 0.3})

  mode = pack_bench.summarize_mode(["lr=0.1", "lr=0.2"], [first, second], wall_s=30.0)

  # The eval event, 9.0 s into the first run, was written at 1009.0: its run began at 1000.0.
  assert first["span"] == pytest.approx((1006.0, 1008.0))
  assert (first["train_s"], first["img_per_s"]) == (pytest.approx(2.0), pytest.approx(100.0))
  assert second["span"] == pytest.approx((1015.0, 1019.0))
  assert mode["train_s"] == pytest.approx(2.0 + 4.0)
  assert mode["images"] == 400
  assert mode["train_img_per_s"] == pytest.approx(400 / 6.0, abs=0.1)
  assert mode["wall_img_per_s"] == pytest.approx(400 / 30.0, abs=0.1)
  assert (mode["compile_s_sum"], mode["compile_s_max"]) == (5.1, 5.0)
  assert mode["test_error"] == {"lr=0.1": 0.2, "lr=0.2": 0.3}
  assert mode["finished"] == 2


def test_a_populations_members_log_one_compilation_and_train_at_once():
  members = [pack_bench.measure_point(_events(12.5, [(10, 40.0, 20.0)], error), 8,
                                      written_at=1021.0,
                                      summary={"status": "completed", "test_error": error})
             for error in (0.1, 0.15, 0.5)]

  mode = pack_bench.summarize_mode(["a", "b", "c"], members, wall_s=40.0)

  assert mode["compile_s_sum"] == 12.5
  assert mode["train_s"] == pytest.approx(2.0)  # Each member's 2 s, all at the same time.
  assert mode["train_img_per_s"] == pytest.approx(3 * 80 / 2.0)
  assert mode["point_img_per_s"] == {"a": 40.0, "b": 40.0, "c": 40.0}


def test_compilations_are_counted_from_the_compilers_log_lines():
  # Two worker processes compiled the programs at once into an empty cache; a third loaded them.
  worker = ("I1127 16:30:05.557485 1404 compiler.py:823] 'jit_create_state' took at least 0.50 "
            "seconds to compile (41.20s)\n"
            "[train] step 3 epoch 0.00 loss=2.727\n"
            "I1127 16:30:15.394332 1404 compiler.py:823] 'jit_train' took at least 0.50 seconds "
            "to compile (19.87s)\n"
            "I1127 16:30:16.001000 1404 compiler.py:823] 'jit_evaluate' took at least 0.50 "
            "seconds to compile (0.61s)\n"
            "I1127 16:30:33.578651 1404 compiler.py:816] Not writing persistent cache entry for "
            "'jit_stack' because it took < 5.00 seconds to compile (1.30s)\n")
  loaded = ("I1127 16:31:01.533428 1405 compiler.py:125] Persistent compilation cache hit for "
            "'jit_train' with key 'jit_train-da26'\n")

  counted = pack_bench.count_compilations([worker, worker, loaded], above_s=1.0)

  assert counted == {"compilations": 6, "xla_compile_s": 124.74,
                     "compiled_programs": {"jit_create_state": 2, "jit_train": 2, "jit_stack": 2}}


def test_a_point_that_never_trained_is_reported_without_figures():
  trained = pack_bench.measure_point(_events(3.0, [(10, 100.0, 5.0)], 0.2), 10, 100.0,
                                     {"status": "completed", "test_error": 0.2})
  missing = pack_bench.measure_point([], 0, 0.0, None)

  mode = pack_bench.summarize_mode(["a", "b"], [trained, missing], wall_s=9.0)

  assert missing == {"status": "not run", "test_error": None, "train_loss": None}
  assert (mode["finished"], mode["images"]) == (1, 100)
  assert mode["point_status"] == {"a": "completed", "b": "not run"}


def test_union_seconds_counts_overlapping_time_once():
  assert pack_bench.union_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.8)]) == 4.0
  assert pack_bench.union_seconds([]) == 0.0


def test_the_table_has_one_row_per_mode_with_its_figures():
  point = pack_bench.measure_point(_events(15.0, [(100, 1000.0, 16.0)], 0.0625), 10, 50.0,
                                   {"status": "completed", "test_error": 0.0625})
  row = {"mode": "population:8", "status": "completed", "sweep": "s.py", "num_steps": 100,
         "overrides": {"num_steps": 100, "eval_every": 0, "model": {"conv": "im2col"}},
         "batch_size": 10, "device": "NVIDIA H100", "jax": "0.11.2",
         "load_before": [0.5, 0.4, 0.3], "load_after": [1.25, 0.5, 0.3],
         "compilations": 3, "xla_compile_s": 17.04,
         **pack_bench.summarize_mode(["lr=0.1"], [point], wall_s=20.0)}

  table = pack_bench.format_table([row])

  assert table.splitlines()[0] == ("s.py: 1 points, 100 steps at batch 10, on NVIDIA H100 "
                                   '(jax 0.11.2); fixed {"num_steps": 100, "model": '
                                   '{"conv": "im2col"}}')
  assert table.splitlines()[-1] == ("| population:8 | completed (1/1) | 20.0 | 3 (17.0) | "
                                    "15.0 / 15.0 | 1,000 | 50 | 1,000 | 6.2 | 0.5/1.2 |")
