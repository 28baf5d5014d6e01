"""A sweep's points: the language configs/sweeps/*.py write them in, and the run config of each.

A sweep config (`get_config()` of a file in configs/sweeps/) has three fields:
  base:   the run config file every point starts from, optionally with its argument:
          "configs/cifar10.py" or "configs/fashion_mnist.py:width=2". A relative path is read
          from the current directory.
  fixed:  fields set on every point, shaped like the run config: {"num_steps": 600,
          "optimizer": {"lr": 0.05}}. A batch-size sweep follows the linear scaling rule with
          {"optimizer": {"base_batch_size": 128}} (lr is then the lr at batch 128).
  points: a list of {field: value} dicts, built with `axis`, `product`, `zipped` and `chain`.

A point's field is one of the arguments every config file takes (config.MODEL_ARGS: depth, skip,
width, shortcut, variant, dtype; given typed to the base file's `get_config`, so what it derives
from them, such as ResNet-110's warm start in configs/cifar10.py, follows), an alias (lr, wd,
momentum) or a dotted path into the run config (seed, batch_size, optimizer.nesterov). A point is
named after its fields in order, `depth=56,skip=false,lr=0.1`, and runs in `workdir/<name>`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from resnet_jax import config as config_lib
from resnet_jax import reporting

SWEEP_FILE = "sweep.json"  # The sweep config, saved in its workdir by every run of the sweep.
SWEEP_FIELDS = ("base", "fixed", "points")
MAX_NAME_BYTES = 255  # NAME_MAX on Linux and macOS filesystems.
ALIASES = {"lr": "optimizer.lr", "wd": "optimizer.weight_decay", "momentum": "optimizer.momentum"}

Points = list[dict[str, Any]]
GetConfig = Callable[..., ml_collections.ConfigDict]


# --- The language ---

def axis(field: str, values: Sequence[Any]) -> Points:
  """One field over a list of values: `axis("depth", [20, 56])` -> [{depth: 20}, {depth: 56}]."""
  if isinstance(values, str) or not isinstance(values, Sequence) or not values:
    raise ValueError(f"axis {field!r}: values must be a non-empty list; got {values!r}")
  return [{field: value} for value in values]


def product(*parts: Points) -> Points:
  """Every combination, the last part varying fastest."""
  out: Points = [{}]
  for part in parts:
    out = [_merge(a, b) for a in out for b in part]
  return out


def zipped(*parts: Points) -> Points:
  """The i-th point of every part together; the parts must have equal lengths."""
  lengths = [len(part) for part in parts]
  if len(set(lengths)) > 1:
    fields = [sorted({k for point in part for k in point}) for part in parts]
    raise ValueError(f"zipped parts must have the same number of points; got {lengths} points "
                     f"for fields {fields}")
  out = []
  for group in zip(*parts):
    point: dict[str, Any] = {}
    for part_point in group:
      point = _merge(point, part_point)
    out.append(point)
  return out


def chain(*parts: Points) -> Points:
  """The parts' points one after another (e.g. a product plus a few extra points)."""
  return [point for part in parts for point in part]


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
  twice = sorted(a.keys() & b.keys())
  if twice:
    raise ValueError(f"field(s) {', '.join(twice)} set twice in one point: combine each field "
                     "from one axis only")
  return {**a, **b}


# --- Names ---

def format_value(value: Any) -> str:
  """A field value as it appears in names and results.csv: true, 0.1, 1e-05, 32000_48000."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (list, tuple)):
    return "_".join(format_value(v) for v in value)
  return str(value)  # For floats the shortest text that reads back as the same number.


def point_name(fields: dict[str, Any]) -> str:
  """`{"depth": 56, "skip": False}` -> "depth=56,skip=false"."""
  if not fields:
    raise ValueError("a point must set at least one field")
  name = ",".join(f"{key}={format_value(value)}" for key, value in fields.items())
  if "/" in name or name.count(",") != len(fields) - 1:
    raise ValueError(f"point fields must not contain '/' or ','; got {name!r}")
  if len(os.fsencode(name)) > MAX_NAME_BYTES:  # The point's workdir is named after it.
    raise ValueError(f"a point's name is its directory's, at most {MAX_NAME_BYTES} bytes; "
                     f"{name[:40]!r}... has {len(os.fsencode(name))}: sweep fewer or shorter "
                     "fields in one point, or put the long ones in `fixed`")
  return name


# --- From a sweep config to validated run configs ---

@dataclasses.dataclass(frozen=True)
class Point:
  index: int  # Its place in the sweep: --point_index.
  name: str  # Its sub-workdir, e.g. "depth=56,skip=false,lr=0.1".
  fields: dict[str, Any]  # What the sweep sets on it, typed: {"depth": 56, "skip": False}.
  config: ml_collections.ConfigDict  # The run config, validated.

  def run_dir(self, workdir: str) -> str:
    """Where it runs in the sweep's `workdir`."""
    return os.path.join(workdir, self.name)

  def summary(self, workdir: str) -> reporting.Summary | None:
    """How its run ended, or None before it wrote its summary (pending, running, interrupted)."""
    return reporting.Summary.read(self.run_dir(workdir))


def expand(sweep_config: ml_collections.ConfigDict) -> list[Point]:
  """Every point of the sweep with its validated run config.

  Raises:
    ConfigError: before anything runs, listing every problem: unknown sweep or config fields,
      values of the wrong type, configs that `config.validate` rejects, duplicate names.
  """
  unknown = sorted(set(sweep_config.keys()) - set(SWEEP_FIELDS))
  missing = [f for f in ("base", "points") if f not in sweep_config]
  if unknown or missing:
    raise config_lib.ConfigError(
        f"a sweep config has the fields {', '.join(SWEEP_FIELDS)}; unknown: "
        f"{unknown or 'none'}, missing: {missing or 'none'}")
  path, _, base_arg = sweep_config.base.partition(":")
  get_config = load_get_config(path)
  fixed = sweep_config.get("fixed") or {}
  errors: list[str] = []
  points: list[Point] = []
  for index, fields in enumerate(sweep_config.points):
    try:
      name = point_name(fields)
      config = point_config(get_config, base_arg, fixed, fields)
      config_lib.validate(config)
    except (ValueError, TypeError) as e:
      errors.append(f"point {index} {dict(fields)}: " + str(e).replace("\n", "\n    "))
      continue
    points.append(Point(index, name, dict(fields), config))
  names = [p.name for p in points]
  errors += [f"two points are both named {n!r}" for n in sorted({n for n in names
                                                                   if names.count(n) > 1})]
  if not sweep_config.points:
    errors.append("the sweep has no points")
  if errors:
    raise config_lib.ConfigError("invalid sweep:\n  " + "\n  ".join(errors))
  return points


def point_config(get_config: GetConfig, base_arg: str, fixed: Mapping[str, Any],
                 fields: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The run config of one point: base file (with its model arguments), then fixed, then fields.

  base_arg is the base file's argument as text ("width=0.5"); the point's model arguments join
  it typed, overriding it, and the file's `get_config` parses both.
  """
  model_args = {**config_lib.split_arg(base_arg),
                **{k: v for k, v in fields.items() if k in config_lib.MODEL_ARGS}}
  config = get_config(model_args) if model_args else get_config()
  for path, value in config_lib.flatten(fixed).items():
    _set_field(config, path, value)
  for key, value in fields.items():
    if key not in config_lib.MODEL_ARGS:
      _set_field(config, ALIASES.get(key, key), value)
  return config


def _set_field(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  node = config
  *parents, leaf = path.split(".")
  for key in parents:
    node = node.get(key) if isinstance(node, ml_collections.ConfigDict) else None
  if (not isinstance(node, ml_collections.ConfigDict) or leaf not in node
      or isinstance(node[leaf], ml_collections.ConfigDict)):
    raise ValueError(
        f"unknown config field {path!r}: a field is a model argument "
        f"({', '.join(config_lib.MODEL_ARGS)}), "
        f"an alias ({', '.join(ALIASES)}) or a dotted path to a field of resnet_jax/config.py "
        "such as optimizer.momentum")
  try:
    node[leaf] = value
  except TypeError as e:
    raise ValueError(f"config field {path!r}: {e}") from None


def load_get_config(path: str) -> GetConfig:
  """The `get_config` of a config file, loaded the way ml_collections.config_flags does.

  A relative path is read from the current directory (a sweep's worker processes inherit it).
  """
  if not os.path.isfile(path):
    raise config_lib.ConfigError(
        f"config file {path!r} not found (a relative path is read from the current directory, "
        f"{os.getcwd()})")
  spec = importlib.util.spec_from_file_location("sweep_base_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config


# --- sweep.json ---

def save_sweep(sweep_config: ml_collections.ConfigDict, workdir: str) -> None:
  """Saves the sweep config in `workdir`, so that later commands need only --workdir."""
  reporting.write_text_atomic(os.path.join(workdir, SWEEP_FILE),
                              sweep_config.to_json(indent=2) + "\n")


def load_sweep(workdir: str) -> ml_collections.ConfigDict:
  """The sweep config an earlier run saved in `workdir`.

  Raises:
    ConfigError: there is none.
    reporting.RecordError: it is damaged (the message says how to write it again).
  """
  path = os.path.join(workdir, SWEEP_FILE)
  again = "pass --config=configs/sweeps/<name>.py to write it again"
  try:
    # Field order matters (it names the points), and json keeps it.
    stored = reporting.read_json(path, dict, keys=("base", "points"))
  except FileNotFoundError:
    raise config_lib.ConfigError(f"{path} not found: pass --config=configs/sweeps/<name>.py"
                                 ) from None
  except reporting.RecordError as e:
    raise reporting.RecordError(f"{e}; {again}") from None
  if (not isinstance(stored["base"], str) or not isinstance(stored["points"], list)
      or not all(isinstance(point, dict) for point in stored["points"])):
    raise reporting.RecordError(f"{path} is damaged: base must be a string and points a list of "
                                f"objects; {again}")
  return ml_collections.ConfigDict(stored)
