"""Throughput, compiled memory and MFU of one model step: forward, fine-tune train or SimMIM.

  python -m swinv2_jax.benchmark                                  # SwinV2-T w8/256, batch 8
  python -m swinv2_jax.benchmark --mode=train --batch=8 --dtype=bfloat16
  python -m swinv2_jax.benchmark --mode=simmim --model=swinv2_base_window12_192 --remat=full
  python -m swinv2_jax.benchmark --fake_devices=8 --mesh=data=8 --zero=3 --mode=train
  python -m swinv2_jax.benchmark --mode=train --compare=timm     # PyTorch (timm) alongside
  python -m swinv2_jax.benchmark --compare=timm --torch_python=/tmp/torchenv/bin/python
  python -m swinv2_jax.benchmark --json                          # one JSON object on stdout

What is timed: the project's own jitted step (trainer.py): `forward` is the evaluation step
(classifier in eval mode, parameters sharded as in training); `train` is the fine-tune step
(soft-target cross-entropy with label smoothing, mixup/cutmix off, AdamW with layer decay and
gradient clipping, optional accumulation); `simmim` is the SimMIM pretraining step. The step
is lowered and compiled ahead of time (reported apart as compile_s, never in the timings);
then `--warmup` untimed and `--iters` timed calls, each ended by `jax.block_until_ready` on
everything the step returns. Input data is random and already on the devices: no input
pipeline is timed.

Figures: images/s from the median step time (and from the mean: all timed images over all
timed seconds); compiled per-device memory from `compiled.memory_analysis()`; analytic FLOPs
per image = 2 x `complexity.count_macs` (the official count: CPB MLP, softmax and GELU left
out; SimMIM's 1x1-conv decoder too), x 3 for a training step (backward = 2 x forward; remat's
recomputation not counted); achieved TFLOP/s = FLOPs per image x images/s; MFU = achieved /
(peak x devices), the peak being the dense bf16 figure of `config.ACCELERATORS` for the
detected device (or `--peak_tflops`), whatever `--dtype` is. A CPU has no known peak: MFU is
n/a unless `--peak_tflops` is given.

`--threads=N` pins the process to N cores (sched_setaffinity) before JAX starts, so that XLA
sizes its CPU thread pools to N; PyTorch gets `torch.set_num_threads(N)` as well. Unless
`--nohuge_pages`, the process first re-executes itself with glibc's huge-page tunable
(swinv2_jax/hugepages.py, as `main` does), which PyTorch inherits.

`--compare=timm` (torch and timm are optional; without them it says so in one line and exits
with status 2) runs timm's model of the same name, pretrained=False, at the same sizes, batch,
dtype (bfloat16: autocast) and threads, eager and torch.compile'd (its compile time apart, from
an empty inductor cache unless TORCHINDUCTOR_CACHE_DIR is set): forward under
torch.inference_mode, train as cross-entropy, backward, clipping and an AdamW step; and prints
the ratios JAX / PyTorch of images/s. `--torch_python=PYTHON` runs that side in another
interpreter (a venv with torch and timm), so that this one needs neither.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from swinv2_jax import errors  # stdlib only: nothing here may start JAX before main() runs
from swinv2_jax import hugepages  # stdlib only, as errors
from swinv2_jax.accelerators import accelerator_key  # stdlib only, as errors

MODES = ("forward", "train", "simmim")
DTYPES = ("float32", "bfloat16")
# The PyTorch side as its own process: `PYTHON -m swinv2_jax.benchmark --timm_reference` reads
# the settings as JSON on stdin and writes its figures as JSON on stdout (torch, timm, stdlib).
TIMM_REFERENCE_ARG = "--timm_reference"


@dataclasses.dataclass
class Options:
  """The benchmark's settings (the command-line flags of the same names)."""
  model: str = "swinv2_tiny_window8_256"
  img_size: int = 0                      # 0: the preset's
  window_size: str = ""                  # int or comma list per level; '': the preset's
  embed_dim: int = 0                     # 0: the preset's
  depths: list | None = None             # None: the preset's
  num_heads: list | None = None
  batch: int = 8
  dtype: str = "float32"
  mode: str = "forward"
  accum_steps: int = 1
  remat: str = "none"
  attention_chunks: str = "1"
  attention_impl: str = "xla"
  mesh: str = "data=-1"
  fake_devices: int = 0
  zero: int = 1
  iters: int = 5
  warmup: int = 1
  peak_tflops: float = 0.0
  json: bool = False
  threads: int = 0
  huge_pages: bool = True
  compare: str | None = None
  timm_compile: bool = True
  torch_python: str = ""


def _define_flags():
  """The flags, defined when the module runs as a program (importing it defines none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top  (not in --torch_python's venv)
  d = Options()
  flags.DEFINE_string("model", d.model, "A preset name (swinv2_jax.models.list_models()).")
  flags.DEFINE_integer("img_size", d.img_size, "Input size; 0: the preset's.")
  flags.DEFINE_string("window_size", d.window_size, "Window: an int or one per level (comma "
                      "list); empty: the preset's.")
  flags.DEFINE_integer("embed_dim", d.embed_dim, "Channels of level 1; 0: the preset's.")
  flags.DEFINE_list("depths", d.depths, "Blocks per level; default: the preset's.")
  flags.DEFINE_list("num_heads", d.num_heads, "Heads per level; default: the preset's.")
  flags.DEFINE_integer("batch", d.batch, "Global batch of one step (over all devices).")
  flags.DEFINE_enum("dtype", d.dtype, list(DTYPES), "Compute dtype; parameters stay float32.")
  flags.DEFINE_enum("mode", d.mode, list(MODES), "forward: the evaluation step; train: the "
                    "fine-tune train step; simmim: the SimMIM pretraining step.")
  flags.DEFINE_integer("accum_steps", d.accum_steps, "Microbatches per step (train, simmim).")
  flags.DEFINE_string("remat", d.remat, "none, full, dots or dots_no_batch; or one per level "
                      "(comma list).")
  flags.DEFINE_string("attention_chunks", d.attention_chunks, "Sequential attention: pieces "
                      "per level, an int or a comma list.")
  flags.DEFINE_string("attention_impl", d.attention_impl, "model.attention_impl: 'xla' (every "
                      "window through the einsums), 'cudnn' or 'auto' (unshifted windows through "
                      "jax.nn.dot_product_attention: cuDNN, or cuDNN where it can, else XLA).")
  flags.DEFINE_string("mesh", d.mesh, "Mesh axes and sizes, e.g. data=8 or data=4,fsdp=2 "
                      "(every axis is data-parallel; -1: the remaining devices).")
  flags.DEFINE_integer("fake_devices", d.fake_devices, "N > 0: run on N fake CPU devices "
                       "(memory-optimised XLA CPU scheduler, as the dry run).")
  flags.DEFINE_integer("zero", d.zero, "ZeRO 0-3: sharding of optimizer state (1), gradients "
                       "(2) and parameters (3) over the mesh.")
  flags.DEFINE_integer("iters", d.iters, "Timed iterations.")
  flags.DEFINE_integer("warmup", d.warmup, "Untimed iterations after compilation.")
  flags.DEFINE_float("peak_tflops", d.peak_tflops, "Peak TFLOP/s per device for MFU; 0: the "
                     "detected device's (config.ACCELERATORS), none on CPU.")
  flags.DEFINE_bool("json", d.json, "Print one JSON object only.")
  flags.DEFINE_bool("huge_pages", d.huge_pages, "Back large host buffers with transparent "
                    "huge pages (glibc's malloc.hugetlb tunable, which glibc reads at start-up: "
                    "the benchmark re-executes itself with it set); PyTorch gets it as well.")
  flags.DEFINE_integer("threads", d.threads, "Cores for JAX (and PyTorch): N > 0 pins the "
                       "process to N cores before JAX starts; 0: all it may use.")
  flags.DEFINE_enum("compare", d.compare, ["timm"], "Also run the PyTorch reference (timm's "
                    "model of the same name), eager and torch.compile'd.")
  flags.DEFINE_bool("timm_compile", d.timm_compile, "With --compare=timm: also time "
                    "torch.compile (its compile time reported apart).")
  flags.DEFINE_string("torch_python", d.torch_python, "With --compare=timm: a Python with torch "
                      "and timm (e.g. another venv's bin/python) that runs the PyTorch side in "
                      "its own process; empty: this process imports torch.")


def options_from_flags(flag_values) -> Options:
  return Options(**{f.name: flag_values[f.name].value for f in dataclasses.fields(Options)})


class BenchmarkError(errors.UserError):
  """A bad option: one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Options.
# ---------------------------------------------------------------------------------------------
def _ints(text: str, flag: str) -> int | tuple[int, ...]:
  """'8' -> 8, '8,4,1,1' -> (8, 4, 1, 1)."""
  try:
    values = tuple(int(v) for v in str(text).split(","))
  except ValueError:
    raise BenchmarkError(f"--{flag}={text}: an int or a comma list of ints") from None
  return values[0] if len(values) == 1 else values


def parse_mesh(text: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """'data=8' -> (('data',), (8,)); 'data=4,fsdp=2' -> two axes."""
  axes, shape = [], []
  for part in text.split(","):
    name, eq, size = part.partition("=")
    if not eq or not name.strip() or not re.fullmatch(r"-?\d+", size.strip()):
      raise BenchmarkError(f"--mesh={text}: give axis=size pairs, e.g. data=8 or data=4,fsdp=2")
    axes.append(name.strip())
    shape.append(int(size))
  return tuple(axes), tuple(shape)


def check_options(opts: Options):
  for name, least in (("batch", 1), ("accum_steps", 1), ("iters", 1), ("warmup", 0),
                      ("threads", 0), ("fake_devices", 0)):
    if getattr(opts, name) < least:
      raise BenchmarkError(f"--{name}={getattr(opts, name)}: must be >= {least}")
  if opts.zero not in (0, 1, 2, 3):
    raise BenchmarkError(f"--zero={opts.zero}: 0, 1, 2 or 3")
  if opts.batch % opts.accum_steps:
    raise BenchmarkError(f"--batch={opts.batch}: not a multiple of --accum_steps="
                         f"{opts.accum_steps}")
  if opts.mode == "forward" and opts.accum_steps != 1:
    raise BenchmarkError("--accum_steps: applies to --mode=train and simmim, not forward")
  if opts.compare == "timm" and opts.mode == "simmim":
    raise BenchmarkError("--compare=timm: timm has no SimMIM; compare --mode=forward or train")
  if opts.torch_python and opts.compare != "timm":
    raise BenchmarkError("--torch_python: runs the PyTorch side of --compare=timm; add it")
  parse_mesh(opts.mesh)


def _pin_threads(threads: int) -> int:
  """Restricts this process to `threads` cores (before JAX starts: XLA sizes its CPU thread
  pools from the cores it may run on). Returns the cores it may run on."""
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  if threads and cores is not None:
    if threads > len(cores):
      raise BenchmarkError(f"--threads={threads}: this process may run on {len(cores)} cores")
    os.sched_setaffinity(0, cores[:threads])
    return threads
  return len(cores) if cores is not None else (os.cpu_count() or 1)


def _fresh_inductor_cache() -> None:
  """A cold torch.compile, as JAX's compile is cold unless a persistent cache is configured:
  an empty inductor cache for this process (removed at exit), unless TORCHINDUCTOR_CACHE_DIR
  names one to reuse. Set before torch is imported: some of its paths are fixed at import."""
  if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    fresh = tempfile.mkdtemp(prefix="swinv2_jax_inductor_")
    atexit.register(shutil.rmtree, fresh, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh


def _import_torch():
  """(torch, timm), or a BenchmarkError saying why not: one line."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import timm  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except  (timm may fail inside torchvision)
    raise BenchmarkError(f"--compare=timm needs torch and timm (pip install torch timm), which "
                         f"are not importable here: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
  return torch, timm


def _torch_python_env() -> dict:
  """The environment of a --torch_python process: this repository importable (for this
  module), nothing of JAX's."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  return env


def _check_torch(opts: Options) -> None:
  """Before anything compiles: torch and timm import here, or in --torch_python."""
  if not opts.torch_python:
    _import_torch()
    return
  try:
    done = subprocess.run([opts.torch_python, "-c", "import torch, timm"], capture_output=True,
                          text=True, env=_torch_python_env(), timeout=600)
  except OSError as e:
    raise BenchmarkError(f"--torch_python={opts.torch_python}: {e.strerror}") from None
  if done.returncode:
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise BenchmarkError(f"--torch_python={opts.torch_python}: cannot import torch and timm: "
                         f"{last}")


# ---------------------------------------------------------------------------------------------
# The config of the step.
# ---------------------------------------------------------------------------------------------
def build_config(opts: Options, preset: dict):
  """The project config that the trainer / eval step is built from, for the options."""
  from swinv2_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from swinv2_jax.models.swinv2 import REMAT_POLICIES  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  m = c.model
  m.name = opts.model
  m.dtype = opts.dtype
  if opts.embed_dim:
    m.embed_dim = opts.embed_dim
  if opts.depths:
    m.depths = tuple(_ints(v, "depths") for v in opts.depths)
  if opts.num_heads:
    m.num_heads = tuple(_ints(v, "num_heads") for v in opts.num_heads)
  remat = tuple(opts.remat.split(","))
  for r in remat:
    if r not in REMAT_POLICIES:
      raise BenchmarkError(f"--remat={opts.remat}: each of {', '.join(REMAT_POLICIES)}")
  m.remat = remat[0] if len(remat) == 1 else remat
  chunks = _ints(opts.attention_chunks, "attention_chunks")
  if min(chunks if isinstance(chunks, tuple) else (chunks,)) < 1:
    raise BenchmarkError(f"--attention_chunks={opts.attention_chunks}: pieces must be >= 1")
  m.attention_chunks = chunks
  from swinv2_jax.models.layers import ATTENTION_IMPLS  # pylint: disable=g-import-not-at-top
  if opts.attention_impl not in ATTENTION_IMPLS:
    raise BenchmarkError(f"--attention_impl={opts.attention_impl}: one of "
                         f"{', '.join(ATTENTION_IMPLS)}")
  m.attention_impl = opts.attention_impl
  img = opts.img_size or preset["img_size"]
  window = _ints(opts.window_size, "window_size") if opts.window_size else preset[
      "window_size"]
  stage = c.pretrain if opts.mode == "simmim" else c.finetune
  stage.img_size, stage.window_size = img, window
  stage.pretrained_window_sizes = preset.get("pretrained_window_sizes", 0)
  stage.batch_size, stage.accum_steps = opts.batch, opts.accum_steps
  c.eval.batch_size = opts.batch
  if opts.mode == "simmim":
    # The official 32-pixel mask cells where they divide the image, else one per patch.
    c.pretrain.mask_patch_size = 32 if img % 32 == 0 else c.model.patch_size
  c.data.mixup_alpha = c.data.cutmix_alpha = 0.0  # the model, loss and update; not mixup
  axes, shape = parse_mesh(opts.mesh)
  c.mesh.axes, c.mesh.shape, c.mesh.zero = axes, shape, opts.zero
  return c


def _num_classes(preset: dict) -> int:
  return int(preset.get("num_classes", 1000))


def flops_per_image(config, mode: str, num_classes: int) -> float:
  """2 x MACs of one forward (complexity.count_macs), x 3 for a training step."""
  from swinv2_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from swinv2_jax.models import complexity  # pylint: disable=g-import-not-at-top
  args = config_lib.model_args(config, {"forward": "eval", "train": "finetune",
                                        "simmim": "pretrain"}[mode])
  args["num_classes"] = 0 if mode == "simmim" else num_classes
  forward = 2.0 * complexity.count_macs(args)
  return forward if mode == "forward" else 3.0 * forward


# ---------------------------------------------------------------------------------------------
# The JAX step: built, compiled ahead of time, timed.
# ---------------------------------------------------------------------------------------------
def _memory(compiled) -> tuple[dict, float]:
  """(per-device bytes of the compiled step from XLA's buffer assignment, XLA's FLOPs)."""
  from swinv2_jax import plan  # pylint: disable=g-import-not-at-top
  xla = plan._xla_figures(compiled)  # pylint: disable=protected-access
  mem = compiled.memory_analysis()
  get = lambda name: int(getattr(mem, name, 0) or 0) if mem is not None else 0
  return dict(arguments=xla["arguments"], outputs=get("output_size_in_bytes"),
              temp=xla["temp"], aliased=xla["aliased"],
              generated_code=get("generated_code_size_in_bytes")), xla["flops"]


def _random_batch(spec: dict, shardings: dict, num_classes: int, config, seed: int = 0):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from swinv2_jax.data import transforms  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  out = {}
  for key, s in spec.items():
    if key == "image":
      value = rng.standard_normal(s.shape, dtype=np.float32)
    elif key == "label":
      value = rng.integers(0, num_classes, s.shape).astype(np.int32)
    elif key == "valid":
      value = np.ones(s.shape, np.bool_)
    elif key == "mask":
      p = config.pretrain
      lead, grid = s.shape[:-2], s.shape[-2:]
      masks = [transforms.simmim_mask(rng, p.img_size, p.mask_patch_size,
                                      config.model.patch_size, p.mask_ratio)
               for _ in range(math.prod(lead))]
      value = np.stack(masks).reshape(lead + grid).astype(np.int32)
    else:
      raise AssertionError(f"unexpected batch entry {key}")
    out[key] = jax.device_put(value, shardings[key])
  return out


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
  return usage.ru_utime + usage.ru_stime


def _time_calls(call, warmup: int, iters: int) -> tuple[list[float], float]:
  """(seconds of each timed call, process CPU seconds per wall second over them): `call()`
  runs one step and blocks until it is done."""
  for _ in range(warmup):
    call()
  times = []
  cpu = _cpu_seconds()
  for _ in range(iters):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return times, (_cpu_seconds() - cpu) / sum(times)


def run_jax(opts: Options, config, num_classes: int, layout) -> dict:
  """Builds, compiles (timed apart) and times the step. Returns the raw figures."""
  import jax  # pylint: disable=g-import-not-at-top
  from swinv2_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from swinv2_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from swinv2_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  mode, mesh = opts.mode, layout.mesh
  key = jax.device_put(jax.random.key(0), layout.replicated())
  if mode == "forward":
    eval_step = trainer_lib.make_eval_step(config, num_classes, layout)
    spec = trainer_lib.abstract_eval_batch(config)
    shardings = {k: layout.batch(len(v.shape)) for k, v in spec.items()}
    abstract_params = checkpointing.abstract_with_shardings(eval_step.abstract_params,
                                                            eval_step.param_shardings)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
      lowered = eval_step.counts.lower(
          abstract_params, checkpointing.abstract_with_shardings(spec, shardings))
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    params = jax.jit(lambda: trainer_lib.split_params(trainer_lib.build_classifier(
        config, "eval", num_classes, config.seed))[1],
                     out_shardings=eval_step.param_shardings)()
    batch = _random_batch(spec, shardings, num_classes, config)
    memory, xla_flops = _memory(compiled)
    memory["params"] = sharding_lib.per_device_bytes(eval_step.abstract_params,
                                                     eval_step.param_shardings)
    memory["opt_state"] = 0
    num_params = sum(x.size for x in jax.tree.leaves(eval_step.abstract_params))

    def call():
      jax.block_until_ready(compiled(params, batch))
  else:
    task = (trainer_lib.simmim_task(config) if mode == "simmim"
            else trainer_lib.finetune_task(config, num_classes))
    trainer = trainer_lib.make_trainer(config, task, layout)
    spec = trainer_lib.trainer_batch(config, trainer)
    shardings = trainer_lib.batch_shardings(layout, spec)
    start = time.perf_counter()
    lowered = trainer_lib.lower_step(trainer, spec)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    from swinv2_jax import plan  # pylint: disable=g-import-not-at-top
    summary = plan.memory_summary(compiled, trainer)
    memory, xla_flops = _memory(compiled)
    memory["params"], memory["opt_state"] = summary["params"], summary["opt_state"]
    num_params = trainer.num_params
    holder = dict(state=trainer.init())
    batch = _random_batch(spec, shardings, num_classes, config)

    def call():
      holder["state"], metrics = compiled(holder["state"], batch, key)
      jax.block_until_ready((holder["state"], metrics))

  times, cores_busy = _time_calls(call, opts.warmup, opts.iters)
  return dict(times=times, cores_busy=cores_busy, compile_s=compile_s, lower_s=lower_s,
              memory=memory,
              xla_flops_per_device=xla_flops, params=int(num_params),
              mesh=dict(zip(mesh.axis_names, (int(n) for n in mesh.devices.shape))))


# ---------------------------------------------------------------------------------------------
# The PyTorch reference (timm), on the same machine, model, batch, dtype and threads.
# ---------------------------------------------------------------------------------------------
def timm_settings(opts: Options, config, num_classes: int, threads: int, platform: str) -> dict:
  """What the PyTorch side runs, as plain JSON values (it may run in another interpreter)."""
  stage, m = config.finetune, config.model
  if not isinstance(stage.window_size, int):
    raise BenchmarkError("--compare=timm: timm takes one window size for all levels, got "
                         f"{stage.window_size}")
  kwargs = dict(img_size=stage.img_size, window_size=stage.window_size,
                num_classes=num_classes,
                drop_path_rate=stage.drop_path_rate if opts.mode == "train" else 0.0)
  for key in ("embed_dim", "depths", "num_heads"):
    if m[key] is not None:
      kwargs[key] = list(m[key]) if isinstance(m[key], tuple) else m[key]
  return dict(name=m.name, kwargs=kwargs, mode=opts.mode, batch=opts.batch,
              accum_steps=opts.accum_steps, bfloat16=m.dtype == "bfloat16", threads=threads,
              platform=platform, warmup=opts.warmup, iters=opts.iters,
              compile=opts.timm_compile, lr=stage.base_lr, betas=list(stage.betas),
              weight_decay=stage.weight_decay, clip_grad=stage.clip_grad,
              label_smoothing=float(config.data.label_smoothing))


def timm_reference(t: dict) -> dict:
  """Times timm's model for the settings of `timm_settings`. Needs torch, timm and the stdlib
  only, so that it runs in a --torch_python interpreter too."""
  torch, timm = _import_torch()
  mode, name, batch, accum = t["mode"], t["name"], t["batch"], t["accum_steps"]
  if not timm.is_model(name):
    raise BenchmarkError(f"--compare=timm: timm has no model {name!r}")
  torch.set_num_threads(t["threads"])
  device = torch.device("cuda" if t["platform"] == "gpu" and torch.cuda.is_available()
                        else "cpu")
  torch.manual_seed(0)
  model = timm.create_model(name, pretrained=False, **t["kwargs"]).to(device)
  size, num_classes = t["kwargs"]["img_size"], t["kwargs"]["num_classes"]
  images = torch.randn(batch, 3, size, size, device=device)
  labels = torch.randint(0, num_classes, (batch,), device=device)
  autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if (
      t["bfloat16"]) else contextlib.nullcontext
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

  def step_fn(net):
    if mode == "forward":
      net.eval()

      def call():
        with torch.inference_mode(), autocast():
          net(images)
        sync()
      return call
    net.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], betas=tuple(t["betas"]),
                            weight_decay=t["weight_decay"])

    def call():
      for x, y in zip(images.chunk(accum), labels.chunk(accum)):
        with autocast():
          loss = torch.nn.functional.cross_entropy(
              net(x).float(), y, label_smoothing=t["label_smoothing"]) / accum
        loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), t["clip_grad"])
      opt.step()
      opt.zero_grad(set_to_none=True)
      sync()
    return call

  out = {}
  times, busy = _time_calls(step_fn(model), t["warmup"], t["iters"])
  out["eager"] = dict(_rates(times, batch), cores_busy=busy)
  if t["compile"]:
    call = step_fn(torch.compile(model))
    start = time.perf_counter()
    call()  # compiles (forward, and the backward for a train step) and runs once
    first_s = time.perf_counter() - start
    times, busy = _time_calls(call, max(t["warmup"] - 1, 0), t["iters"])
    out["compiled"] = dict(_rates(times, batch), cores_busy=busy, first_call_s=first_s,
                           compile_s=max(first_s - statistics.median(times), 0.0),
                           inductor_cache=os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
  out.update(torch_version=torch.__version__, timm_version=timm.__version__,
             device=str(device), threads=torch.get_num_threads(),
             params=int(sum(p.numel() for p in model.parameters())))
  return out


def run_timm(opts: Options, config, num_classes: int, threads: int, platform: str) -> dict:
  """The PyTorch reference in this process, or in --torch_python's (which inherits this
  process's cores and inductor cache; JAX sits idle meanwhile)."""
  settings = timm_settings(opts, config, num_classes, threads, platform)
  if not opts.torch_python:
    return timm_reference(settings)
  done = subprocess.run([opts.torch_python, "-m", "swinv2_jax.benchmark", TIMM_REFERENCE_ARG],
                        input=json.dumps(settings), capture_output=True, text=True,
                        env=_torch_python_env())
  if done.returncode == errors.EXIT_USER_ERROR:
    raise BenchmarkError(done.stderr.strip().splitlines()[-1].removeprefix("error: "))
  if done.returncode:
    raise RuntimeError(f"--torch_python={opts.torch_python} failed (status {done.returncode}):"
                       f"\n{done.stderr[-3000:]}")
  return json.loads(done.stdout)


def timm_reference_main() -> None:
  """`--timm_reference`: settings as JSON on stdin, figures as JSON on stdout."""
  try:
    result = timm_reference(json.load(sys.stdin))
  except BenchmarkError as e:
    errors.report(e)
    sys.exit(errors.EXIT_USER_ERROR)
  print(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Figures and output.
# ---------------------------------------------------------------------------------------------
def _rates(times: list[float], batch: int) -> dict:
  median = statistics.median(times)
  return dict(step_s=median, step_s_mean=statistics.fmean(times), step_s_min=min(times),
              step_s_max=max(times), step_times_s=times, images_per_s=batch / median,
              images_per_s_mean=batch * len(times) / sum(times))


def _peak(opts: Options, device_kind: str) -> tuple[float | None, str | None]:
  from swinv2_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  if opts.peak_tflops > 0:
    return opts.peak_tflops, "--peak_tflops"
  key = accelerator_key(device_kind)
  if key is None:
    return None, None
  return config_lib.ACCELERATORS[key], key


def _bytes(n: int) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_text(result: dict) -> str:
  s = result["settings"]
  mesh = " x ".join(f"{k}={v}" for k, v in s["mesh"].items())
  lines = [
      f"{s['model']} {s['img_size']}/w{s['window_size']}, {s['mode']}, batch {s['batch']} "
      f"(accum {s['accum_steps']}), {s['dtype']}, remat {s['remat']}, attention chunks "
      f"{s['attention_chunks']} ({s['attention_impl']})",
      f"{s['num_devices']} x {s['device_kind']} ({s['platform']}), mesh {mesh}, ZeRO "
      f"{s['zero']}, {s['threads']} threads, jax {s['jax_version']}"
      + (", persistent compilation cache on" if s["compilation_cache"] else "")
      + (", transparent huge pages" if s["huge_pages"] else ""),
      f"parameters             {result['params']:,}",
      f"compile (lower+compile) {result['compile_s']:.2f} s  (lower {result['lower_s']:.2f} s; "
      "not in the timings)",
      f"step                   {result['step_s'] * 1e3:.1f} ms median, "
      f"{result['step_s_mean'] * 1e3:.1f} ms mean over {s['iters']} (after {s['warmup']} "
      "warm-up)",
      f"images/s               {result['images_per_s']:.2f} median, "
      f"{result['images_per_s_mean']:.2f} mean ({result['cores_busy']:.2f} cores busy: "
      "process CPU s per s)",
      f"FLOPs / image          {result['flops_per_image']:.4g} (analytic, "
      f"{'2 x MACs' if s['mode'] == 'forward' else '3 x 2 x MACs'})",
      f"achieved               {result['tflops']:.4g} TFLOP/s",
  ]
  if result["mfu"] is None:
    lines.append("MFU                    n/a (no known peak for this device; --peak_tflops)")
  else:
    lines.append(f"MFU                    {result['mfu']:.1%} of {result['peak_tflops']:g} "
                 f"TFLOP/s x {s['num_devices']} ({result['peak_source']}, dense bf16 peak)")
  m = result["memory"]
  lines.append(f"memory per device      arguments {_bytes(m['arguments'])}, outputs "
               f"{_bytes(m['outputs'])}, temp {_bytes(m['temp'])}, aliased "
               f"{_bytes(m['aliased'])}; params {_bytes(m['params'])}, optimizer state "
               f"{_bytes(m['opt_state'])}")
  compare = result.get("compare")
  if compare:
    t = compare["timm"]
    lines.append(f"PyTorch timm {t['timm_version']} (torch {t['torch_version']}, {t['device']}, "
                 f"{t['threads']} threads)")
    for kind in ("eager", "compiled"):
      if kind in t:
        extra = (f", compile {t[kind]['compile_s']:.1f} s (first call "
                 f"{t[kind]['first_call_s']:.1f} s)" if kind == "compiled" else "")
        lines.append(f"  {kind:<9} {t[kind]['images_per_s']:.2f} images/s, "
                     f"{t[kind]['step_s'] * 1e3:.1f} ms/step{extra}; JAX / PyTorch "
                     f"{compare['ratio'][kind]:.2f}x")
  return "\n".join(lines)


def benchmark(opts: Options) -> dict:
  """Everything after the options are parsed: device set-up, the step, the figures."""
  check_options(opts)
  threads = _pin_threads(opts.threads)
  if opts.compare == "timm":
    if opts.timm_compile:
      _fresh_inductor_cache()
    _check_torch(opts)  # before compiling anything: say at once when it cannot run
  if opts.fake_devices:
    from swinv2_jax import plan  # pylint: disable=g-import-not-at-top
    devices = plan.use_fake_cpu_devices(opts.fake_devices)
  import jax  # pylint: disable=g-import-not-at-top
  from swinv2_jax import models  # pylint: disable=g-import-not-at-top
  from swinv2_jax import plan  # pylint: disable=g-import-not-at-top
  from swinv2_jax import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  if opts.model not in models.PRESETS:
    raise BenchmarkError(f"--model={opts.model}: unknown; known: "
                         f"{', '.join(models.list_models())}")
  preset = models.PRESETS[opts.model]
  num_classes = _num_classes(preset)
  config = build_config(opts, preset)
  mode = opts.mode
  devices = devices if opts.fake_devices else jax.devices()
  try:
    layout = trainer_lib.make_layout(config, devices)
  except ValueError as e:  # 'mesh.shape (3,) does not divide 8 devices'
    raise BenchmarkError(f"--mesh={opts.mesh}: {e}") from None
  per_step = opts.accum_steps * layout.mesh.size
  if opts.batch % per_step:
    raise BenchmarkError(f"--batch={opts.batch}: not a multiple of accum_steps x devices = "
                         f"{opts.accum_steps} x {layout.mesh.size}")
  raw = run_jax(opts, config, num_classes, layout)
  rates = _rates(raw["times"], opts.batch)
  fpi = flops_per_image(config, mode, num_classes)
  tflops = fpi * rates["images_per_s"] / 1e12
  device_kind = devices[0].device_kind
  peak, peak_source = _peak(opts, device_kind)
  stage = config.pretrain if mode == "simmim" else config.finetune
  m = config.model
  settings = dict(
      model=m.name, img_size=stage.img_size, window_size=stage.window_size,
      embed_dim=m.embed_dim, depths=m.depths, num_heads=m.num_heads, batch=opts.batch,
      dtype=m.dtype, mode=mode, accum_steps=opts.accum_steps, remat=m.remat,
      attention_chunks=m.attention_chunks, attention_impl=opts.attention_impl,
      mesh=raw["mesh"], zero=opts.zero, iters=opts.iters, warmup=opts.warmup,
      threads=threads, fake_devices=opts.fake_devices, num_devices=layout.mesh.size,
      platform=devices[0].platform, device_kind=device_kind, jax_version=jax.__version__,
      num_classes=0 if mode == "simmim" else num_classes,
      scheduler=("memory-optimised" if plan.MEMORY_SCHEDULER_FLAG in
                 os.environ.get("XLA_FLAGS", "") else "default"),
      compilation_cache=bool(jax.config.jax_compilation_cache_dir),
      huge_pages=hugepages.active())
  result = dict(
      settings=settings, params=raw["params"], compile_s=raw["compile_s"],
      lower_s=raw["lower_s"], **rates, cores_busy=raw["cores_busy"], flops_per_image=fpi,
      flops_per_step=fpi * opts.batch, tflops=tflops,
      xla_flops_per_device=raw["xla_flops_per_device"], peak_tflops=peak,
      peak_source=peak_source,
      mfu=None if peak is None else tflops / (peak * layout.mesh.size),
      memory=raw["memory"])
  if opts.compare == "timm":
    ref = run_timm(opts, config, num_classes, threads, devices[0].platform)
    ratio = {k: rates["images_per_s"] / ref[k]["images_per_s"]
             for k in ("eager", "compiled") if k in ref}
    result["compare"] = dict(timm=ref, ratio=ratio)
  return result


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise BenchmarkError(f"unexpected arguments {argv[1:]} (see --help)")
  if not flags.FLAGS["verbosity"].present:  # absl's app logs INFO; keep stderr for problems
    logging.set_verbosity(logging.WARNING)
  opts = options_from_flags(flags.FLAGS)
  if opts.huge_pages and not hugepages.active() and hugepages.possible():
    check_options(opts)  # a bad option is reported once, before the re-execution
    hugepages.reexec()
  result = benchmark(opts)
  if opts.json:
    print(json.dumps(result))
  else:
    print(format_text(result))


def run_main(argv):
  """main, with a user error as one `error: ...` line (status 2)."""
  try:
    main(argv)
  except Exception as e:  # pylint: disable=broad-except
    if not errors.is_user_error(e):
      raise
    errors.report(e)
    sys.exit(errors.EXIT_USER_ERROR)


if __name__ == "__main__":
  if sys.argv[1:] == [TIMM_REFERENCE_ARG]:
    timm_reference_main()
  else:
    from absl import app  # pylint: disable=g-import-not-at-top
    _define_flags()
    app.run(run_main)
