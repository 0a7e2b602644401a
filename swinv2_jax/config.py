"""The run configuration: every key with its default, and the checks applied before a run.

Config files (configs/*.py) start from `base_config()` and change values; a key that is not
here is an error, and so is a bad value: one line that names the key.
"""

from __future__ import annotations

import difflib
import json
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from swinv2_jax import data as data_lib
from swinv2_jax import errors
from swinv2_jax.accelerators import ACCELERATORS  # plan.accelerator's keys
from swinv2_jax import models
from swinv2_jax.models import windows as win
from swinv2_jax.models.layers import ATTENTION_IMPLS
from swinv2_jax.models.swinv2 import REMAT_POLICIES, SwinTransformerV2, per_level

STAGES = ("pretrain", "finetune", "eval")
TRAINING_STAGES = ("pretrain", "finetune")
# float16 is left out: it needs loss scaling, which this codebase does not do.
DTYPES = ("float32", "bfloat16")


def _train_stage(**overrides) -> ml_collections.ConfigDict:
  """Settings shared by the SimMIM pretraining and the fine-tuning stage."""
  stage = ml_collections.ConfigDict(dict(
      img_size=192,
      window_size=12,                # int, or one per model level
      pretrained_window_sizes=0,     # int, or one per model level (0 = own window)
      batch_size=128,                # global, over all processes: one optimizer update
      # Gradient accumulation: the global batch runs as accum_steps microbatches, each spread
      # over every data-parallel device (batch_size = accum_steps x microbatch x devices).
      # 'auto': the largest microbatch whose step fits plan.device_memory_gb.
      accum_steps=1,
      skip_nonfinite=0,              # 0: stop at a non-finite loss; K: skip such updates, stop
                                     # after K in a row
      steps=1000,
      warmup_steps=100,
      base_lr=1e-4,                  # per 512 images: lr = base_lr * batch_size / 512
      warmup_lr=5e-7,                # per 512 images, as base_lr
      min_lr=5e-6,                   # per 512 images, as base_lr
      weight_decay=0.05,
      layer_decay=1.0,
      clip_grad=5.0,
      drop_path_rate=0.1,
      betas=(0.9, 0.999),
      log_every=50,
      checkpoint_every=1000,
  ), type_safe=False)  # per-level settings may be an int or a tuple
  stage.update(overrides)
  return stage


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = STAGES                  # which stages run, in this order
  c.eval_only = False                # evaluate only: eval_checkpoint, else the latest fine-tune
  c.eval_checkpoint = ""             # orbax params dir, or official .pth / .safetensors
  c.dry_run = False                  # build, compile and print the memory plan; train nothing

  c.model = ml_collections.ConfigDict(dict(
      name="swinv2_tiny_window8_256",  # preset (swinv2_jax.models.list_models())
      embed_dim=config_dict.placeholder(int),
      depths=config_dict.placeholder(tuple),
      num_heads=config_dict.placeholder(tuple),
      patch_size=4,
      extra_norm_period=config_dict.placeholder(int),
      dtype="float32",               # compute dtype; params stay float32
      remat="none",                  # per model level or one: none, full, dots, dots_no_batch
      attention_chunks=1,            # sequential attention: pieces per model level
      attention_impl="xla",          # unshifted windows: 'xla' einsums, 'cudnn' or 'auto' fused
  ), type_safe=False)

  c.data = data_lib.default_data_config("imagenet2012")

  c.pretrain = _train_stage(
      mask_patch_size=32, mask_ratio=0.6,
      norm_target_window=47,         # 0 = raw pixel targets
      image_every=1000,              # steps: TensorBoard images of masked input, reconstruction
                                     # and original (first images of the batch); 0 = none
  )
  c.finetune = _train_stage(
      img_size=224, window_size=14, pretrained_window_sizes=(12, 12, 12, 6),
      base_lr=1.25e-3, warmup_lr=2.5e-7, min_lr=2.5e-6, layer_decay=0.75,
      init="pretrain",               # 'pretrain', 'scratch', or a .pth/.safetensors/orbax path
      drop_head=True,                # when init is a checkpoint with another head
      ema_decay=0.0,                 # 0 disables the EMA of the weights
      eval_every=0,                  # steps; 0 = only at the end
  )
  c.eval = ml_collections.ConfigDict(dict(batch_size=128))

  c.mesh = ml_collections.ConfigDict(dict(
      axes=("data",),
      shape=(-1,),                   # one -1 takes the remaining devices
      zero=1,
      # Regex on the parameter path -> 'auto' (largest divisible dim), 'replicate' or a spec.
      rules=((".*", "auto"),),
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(keep=2, use_async=True))
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="",        # host:port; 'auto' (Cloud TPU VMs); '' = JAX_* env vars,
                                     # a detected SLURM job, or a single process
      num_processes=0,
      process_id=-1,
      # A process that stops sending heartbeats this long is taken as lost: the others then
      # exit non-zero naming it, instead of waiting forever in a collective.
      heartbeat_timeout_s=100,
  ))
  c.plan = ml_collections.ConfigDict(dict(
      num_devices=8,                 # the mesh a dry run compiles for, on fake CPU devices
      device_memory_gb=40.0,         # the budget accum_steps='auto' fits a microbatch into
      accelerator="a100-40g",        # for the wall-time estimate: a key of config.ACCELERATORS
      mfu=0.4,                       # model FLOPs utilisation assumed by that estimate
  ))
  return c


ConfigError = errors.ConfigError

def _fail(key: str, message: str):
  raise ConfigError(f"config.{key}: {message}")


def flatten(tree=None, prefix: str = "") -> dict[str, Any]:
  """Every setting of a config (default: `base_config()`) or of its JSON dict as
  {'group.key': value}, in the tree's order; groups are walked, not listed."""
  tree = base_config() if tree is None else tree
  out = {}
  for key, value in tree.items():
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + str(key)] = value
  return out


def same_value(a, b) -> bool:
  """Equal as JSON values (1 == 1.0, but True != 1)."""
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
  if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or \
      not isinstance(b, (int, float)):
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
  return a == b


ABSENT = object()


def show_value(value) -> str:
  return "absent" if value is ABSENT else json.dumps(value, separators=(", ", ": "))


def differences(old: Mapping, new: Mapping) -> list[str]:
  """'key (old -> new)' for every setting in which two configs (JSON dicts) differ."""
  old_flat, new_flat = flatten(old), flatten(new)
  out = []
  for key in sorted(set(old_flat) | set(new_flat)):
    a, b = old_flat.get(key, ABSENT), new_flat.get(key, ABSENT)
    if a is ABSENT or b is ABSENT or not same_value(a, b):
      out.append(f"{key} ({show_value(a)} -> {show_value(b)})")
  return out


def describe(config: ml_collections.ConfigDict | None = None) -> str:
  """One `config.<key> = <value>` line per setting (the --help listing of main)."""
  return "\n".join(f"config.{key} = {value!r}" for key, value in flatten(config).items())


def _nearest(name: str, candidates, n: int = 3) -> list[str]:
  """Candidates close to `name`: difflib's close matches, then the names that share a
  '_'-separated word with it (`lr` -> `base_lr`), in the candidates' order."""
  candidates = list(candidates)
  close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
  words = set(name.lower().split("_"))
  sharing = [c for c in candidates if words & set(c.lower().split("_"))]
  return list(dict.fromkeys(close + sharing))[:n]


def suggest_keys(key: str, reference: ml_collections.ConfigDict) -> list[str]:
  """Known keys near the unknown dotted `key` ('finetune.lr' -> ['finetune.base_lr', ...]):
  first among its siblings (the keys of the deepest group of `key` that exists), else among
  every setting whose last part is near the last part of `key`."""
  parts = key.split(".")
  group, depth = reference, 0
  while depth < len(parts) - 1 and isinstance(group, ml_collections.ConfigDict) and (
      parts[depth] in group):
    group, depth = group[parts[depth]], depth + 1
  prefix = "".join(p + "." for p in parts[:depth])
  rest = "".join("." + p for p in parts[depth + 1:])  # below a misspelt group name
  if isinstance(group, ml_collections.ConfigDict):
    near = [prefix + k + rest for k in _nearest(parts[depth], group.keys())]
    if near:
      return near
  leaves = list(flatten(reference))
  near = []
  for leaf in _nearest(parts[-1], dict.fromkeys(k.rsplit(".", 1)[-1] for k in leaves)):
    near += [k for k in leaves if k.rsplit(".", 1)[-1] == leaf]
  return near[:3]


def unknown_key_message(key: str, reference: ml_collections.ConfigDict) -> str:
  """'unknown key; did you mean finetune.base_lr?', or the known keys when none is near."""
  near = suggest_keys(key, reference)
  if near:
    return (f"unknown key; did you mean {near[0]}?" if len(near) == 1 else
            f"unknown key; did you mean {', '.join(near[:-1])} or {near[-1]}?")
  parts = key.split(".")
  group = reference
  for i, part in enumerate(parts[:-1]):
    if part not in group:
      break
    if not isinstance(group[part], ml_collections.ConfigDict):
      return f"unknown key: {'.'.join(parts[:i + 1])} is a setting, not a group of settings"
    group = group[part]
  return f"unknown key (known here: {', '.join(sorted(group.keys()))})"


def _check_keys(config, reference, prefix="", root=None):
  root = reference if root is None else root
  for key in config.keys():
    if key not in reference:
      _fail(prefix + key, unknown_key_message(prefix + key, root))
    value, ref = config[key], reference[key]
    if isinstance(ref, ml_collections.ConfigDict) and prefix + key != "data":
      if not isinstance(value, ml_collections.ConfigDict):
        _fail(prefix + key, "must be a group of settings")
      _check_keys(value, ref, prefix + key + ".", root)


def _per_level(key, value, num_levels, kind, allowed=None):
  """One value for every level (also a sequence of one, as --config.model.remat=full gives
  for a tuple setting), or one per level: the model's broadcast, with the types checked."""
  try:
    values = per_level(value, num_levels, key)
  except (TypeError, ValueError):
    values = None
  if values is None or not all(isinstance(v, kind) for v in values):
    _fail(key, f"one {kind.__name__} or one per model level ({num_levels}), got {value!r}")
  if allowed is not None:
    for v in values:
      if v not in allowed:
        _fail(key, f"{v!r} is not one of {sorted(allowed)}")
  return values


def _positive(config, key, *, allow_zero=False, kind=(int, float)):
  value = config
  for part in key.split("."):
    value = value[part]
  if not isinstance(value, kind) or isinstance(value, bool) or value < 0 or (
      value == 0 and not allow_zero):
    _fail(key, f"must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def model_args(config, stage: str) -> dict:
  """SwinTransformerV2 arguments for a training stage (or 'eval', which uses fine-tune sizes)."""
  m = config.model
  sizes = config.finetune if stage == "eval" else config[stage]
  args = dict(patch_size=m.patch_size, img_size=sizes.img_size, window_size=sizes.window_size,
              pretrained_window_sizes=sizes.pretrained_window_sizes,
              remat=m.remat, attention_chunks=m.attention_chunks,
              attention_impl=m.attention_impl)
  for key in ("embed_dim", "depths", "num_heads", "extra_norm_period"):
    if m[key] is not None:
      args[key] = m[key]
  args["drop_path_rate"] = 0.0 if stage == "eval" else sizes.drop_path_rate
  args = models.preset_config(m.name, **args)
  args.pop("num_classes", None)  # the data set decides (22K presets default to 21,841)
  return args


def _check_model(config) -> None:
  """The model's level structure, before the model constructor would find it."""
  m = config.model
  preset = models.PRESETS[m.name]

  def get(key, default=None):
    return m[key] if m[key] is not None else preset.get(key, default)

  depths, heads, embed_dim = get("depths"), get("num_heads"), get("embed_dim")
  if not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim < 1:
    _fail("model.embed_dim", f"must be a positive int, got {embed_dim!r}")
  for key, value in (("depths", depths), ("num_heads", heads)):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
      _fail(f"model.{key}", f"must be a sequence of positive ints (one per level), got "
            f"{value!r}")
  if len(heads) != len(depths):
    _fail("model.num_heads", f"{tuple(heads)} has {len(heads)} entries but model.depths "
          f"{tuple(depths)} has {len(depths)} levels; give one head count per level")
  for i, h in enumerate(heads):
    if (embed_dim * 2**i) % h:
      _fail("model.num_heads", f"level {i} has {embed_dim * 2**i} channels (model.embed_dim="
            f"{embed_dim} x 2^{i}), which {h} heads do not divide")
  period = get("extra_norm_period", 0)
  if not isinstance(period, int) or period < 0 or period % 2:
    _fail("model.extra_norm_period", f"must be an even int >= 0 (0 disables), got {period!r}")
  num_levels = len(depths)
  chunks = _per_level("model.attention_chunks", m.attention_chunks, num_levels, int)
  if min(chunks) < 1:
    _fail("model.attention_chunks", f"pieces must be >= 1, got {min(chunks)}")
  for stage in TRAINING_STAGES:
    s = config[stage]
    feats = win.level_feature_sizes(win.to_pair(s.img_size), m.patch_size, num_levels)
    windows = SwinTransformerV2._level_windows(s.window_size, num_levels)
    for i, (feat, window) in enumerate(zip(feats, windows)):
      window, _ = win.clamp_window(feat, window, (0, 0))
      count = (feat[0] // window[0]) * (feat[1] // window[1])
      if count % min(chunks[i], count):
        _fail("model.attention_chunks", f"{chunks[i]} pieces do not divide the {count} "
              f"windows of level {i} in {stage} ({feat[0]}x{feat[1]} map, window "
              f"{window[0]}x{window[1]}); use a divisor of {count}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one line naming the key) for unknown keys and bad values."""
  _check_keys(config, base_config())
  try:
    data_lib.validate_data_config(config.data)
  except ValueError as e:
    raise ConfigError(f"config.{e}" if str(e).startswith("data.") else f"config.data: {e}")
  stages = tuple(config.stages)
  if not stages or any(s not in STAGES for s in stages):
    _fail("stages", f"a sequence drawn from {STAGES}, got {stages!r}")
  if list(stages) != sorted(stages, key=STAGES.index):
    _fail("stages", f"stages run in the order {STAGES}, got {stages!r}")
  if config.distributed.heartbeat_timeout_s < 1:
    _fail("distributed.heartbeat_timeout_s",
          f"must be >= 1 second, got {config.distributed.heartbeat_timeout_s}")
  if config.model.name not in models.PRESETS:
    _fail("model.name", f"unknown model {config.model.name!r}; known: "
          f"{', '.join(models.list_models())}")
  if config.model.dtype == "float16":
    _fail("model.dtype", "'float16' needs loss scaling, which this codebase does not do (Swin V2 "
          "attention overflows in fp16); use 'bfloat16'")
  if config.model.dtype not in DTYPES:
    _fail("model.dtype", f"one of {DTYPES}, got {config.model.dtype!r}")
  _check_model(config)
  num_levels = len(config.model.depths or models.PRESETS[config.model.name]["depths"])
  _per_level("model.remat", config.model.remat, num_levels, str, set(REMAT_POLICIES))
  if config.model.attention_impl not in ATTENTION_IMPLS:
    _fail("model.attention_impl", f"one of {ATTENTION_IMPLS}, got {config.model.attention_impl!r}")
  if config.model.attention_impl == "cudnn" and config.model.dtype != "bfloat16":
    _fail("model.attention_impl", "'cudnn' takes bfloat16 compute (cuDNN flash attention has no "
          f"{config.model.dtype}); set model.dtype='bfloat16' or use 'auto'")
  for name in TRAINING_STAGES:
    stage = config[name]
    for key in ("batch_size", "steps", "log_every", "checkpoint_every"):
      _positive(config, f"{name}.{key}", kind=int)
    for key in ("warmup_steps", "skip_nonfinite"):
      _positive(config, f"{name}.{key}", allow_zero=True, kind=int)
    if isinstance(stage.accum_steps, str) and stage.accum_steps.strip().isdigit():
      # --config.<stage>.accum_steps=12 over a config file's 'auto' arrives as a string.
      stage.accum_steps = int(stage.accum_steps)
    if stage.accum_steps != "auto":
      _positive(config, f"{name}.accum_steps", kind=int)
    for key in ("base_lr",):
      _positive(config, f"{name}.{key}")
    for key in ("warmup_lr", "min_lr", "weight_decay", "clip_grad"):
      _positive(config, f"{name}.{key}", allow_zero=True)
    if not 0 < stage.layer_decay <= 1:
      _fail(f"{name}.layer_decay", f"must be in (0, 1], got {stage.layer_decay}")
    if not 0 <= stage.drop_path_rate < 1:
      _fail(f"{name}.drop_path_rate", f"must be in [0, 1), got {stage.drop_path_rate}")
    if stage.warmup_steps > stage.steps:
      _fail(f"{name}.warmup_steps", f"{stage.warmup_steps} exceeds {name}.steps={stage.steps}")
    _per_level(f"{name}.window_size", stage.window_size, num_levels, int)
    _per_level(f"{name}.pretrained_window_sizes", stage.pretrained_window_sizes, num_levels, int)
    try:
      win.check_input_size(win.to_pair(stage.img_size), config.model.patch_size,
                           SwinTransformerV2._level_windows(stage.window_size, num_levels))
    except ValueError as e:
      _fail(f"{name}.img_size", str(e))
  p = config.pretrain
  if not 0 < p.mask_ratio < 1:
    _fail("pretrain.mask_ratio", f"must be in (0, 1), got {p.mask_ratio}")
  stride = config.model.patch_size * 2**(num_levels - 1)
  if p.mask_patch_size % config.model.patch_size or p.img_size % p.mask_patch_size:
    _fail("pretrain.mask_patch_size", f"{p.mask_patch_size} must be a multiple of the patch "
          f"size {config.model.patch_size} and divide img_size {p.img_size}")
  if p.img_size % stride:
    _fail("pretrain.img_size", f"{p.img_size} must be a multiple of the encoder stride {stride}")
  if p.norm_target_window and p.norm_target_window % 2 == 0:
    _fail("pretrain.norm_target_window", f"must be odd (or 0), got {p.norm_target_window}")
  _positive(config, "pretrain.image_every", allow_zero=True, kind=int)
  f = config.finetune
  if not isinstance(f.init, str) or not f.init:
    _fail("finetune.init", "'pretrain', 'scratch', or a checkpoint path")
  _positive(config, "finetune.eval_every", allow_zero=True, kind=int)
  if not 0 <= f.ema_decay < 1:
    _fail("finetune.ema_decay", f"must be in [0, 1), got {f.ema_decay}")
  _positive(config, "eval.batch_size", kind=int)
  if len(config.mesh.axes) != len(config.mesh.shape):
    _fail("mesh.shape", f"{tuple(config.mesh.shape)} has not one size per axis "
          f"{tuple(config.mesh.axes)}")
  if config.mesh.zero not in (0, 1, 2, 3):
    _fail("mesh.zero", f"must be 0, 1, 2 or 3, got {config.mesh.zero}")
  for rule in config.mesh.rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      _fail("mesh.rules", f"each rule is (regex, 'auto' | 'replicate' | spec), got {rule!r}")
  _positive(config, "checkpoint.keep", kind=int)
  _positive(config, "plan.num_devices", kind=int)
  _positive(config, "plan.device_memory_gb")
  if config.plan.accelerator not in ACCELERATORS:
    _fail("plan.accelerator", f"one of {', '.join(ACCELERATORS)}, got "
          f"{config.plan.accelerator!r}")
  if not 0 < config.plan.mfu <= 1:
    _fail("plan.mfu", f"must be in (0, 1], got {config.plan.mfu}")


def to_pair(size) -> tuple[int, int]:
  return win.to_pair(size)


def resolve_accum_steps(config, stage: str, accum_steps: int | None = None) -> int:
  """The accumulation of a training stage: `accum_steps` when given (the memory plan resolves
  'auto' so), else the config's value."""
  if accum_steps is not None:
    return int(accum_steps)
  value = config[stage].accum_steps
  if value == "auto":
    raise ConfigError(f"config.{stage}.accum_steps: 'auto' is resolved by the memory plan")
  return int(value)


def check_batches(config, num_devices: int) -> None:
  """Batch arithmetic against the data-parallel device count, before anything compiles:
  every global batch that will run is accum_steps x microbatch x devices, and the eval batch
  divides over the devices."""
  running = ("eval",) if config.eval_only else tuple(config.stages)
  for name in (s for s in TRAINING_STAGES if s in running):
    s = config[name]
    accum = None if s.accum_steps == "auto" else int(s.accum_steps)
    if accum is None:
      if s.batch_size % num_devices:
        _fail(f"{name}.batch_size", f"{s.batch_size} does not divide over {num_devices} "
              f"devices; use a multiple of {num_devices}")
    elif s.batch_size % (accum * num_devices):
      per = s.batch_size / (accum * num_devices)
      _fail(f"{name}.batch_size", f"{s.batch_size} is not {name}.accum_steps={accum} x "
            f"microbatch x {num_devices} devices (microbatch would be {per:g} per device); "
            f"use a multiple of {accum * num_devices} or change {name}.accum_steps")
  if "eval" in running or (config.finetune.eval_every and "finetune" in running):
    if config.eval.batch_size % num_devices:
      _fail("eval.batch_size", f"{config.eval.batch_size} does not divide over {num_devices} "
            f"devices; use a multiple of {num_devices}")
