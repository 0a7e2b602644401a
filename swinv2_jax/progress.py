"""What a run shows while it runs, and what it leaves for TensorBoard.

- `MetricWriter`: metrics.jsonl and TensorBoard scalars and images (process 0), through
  etils.epath (`swinv2_jax.paths`), so that a gs:// workdir works.
- `Progress`: what the log shows. "compiling..." and the summary table at the start of each
  training stage; a progress line every log period (step/total, epoch, loss, lr, grad norm,
  images/s, TFLOP/s per device and MFU, input wait, the ETA of the stage and of the job); the
  progress of each evaluation; at the end, the time of each stage, the final metrics and where
  everything was written. On a terminal a live bar (tqdm) also shows the step between lines.
- `Reconstructions`: SimMIM's masked input, reconstruction and original side by side, from a
  few images, by a small jitted function of its own (never inside the update step): for
  TensorBoard every `pretrain.image_every` steps, and for `python -m swinv2_jax.report`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from swinv2_jax import accelerators
from swinv2_jax import config as config_lib
from swinv2_jax import paths
from swinv2_jax import plan as plan_lib
from swinv2_jax import simmim
from swinv2_jax import workdir as workdir_lib

EVAL_LINE_S = 30.0  # an evaluation longer than this logs where it is, every this many seconds


# ---------------------------------------------------------------------------------------------
# metrics.jsonl and TensorBoard.
# ---------------------------------------------------------------------------------------------
class MetricWriter:
  """One JSON object per logged step in metrics.jsonl, and TensorBoard scalars and images
  (process 0 only).

  tensorboardX writes local files only: for a workdir elsewhere (gs://) its event files are
  written in a local temporary folder and copied to WORKDIR/tensorboard after each record, a
  whole-file upload as TensorFlow's own GCS writer does on flush. metrics.jsonl is appended
  to where local, and rewritten whole elsewhere (an object store cannot append). The
  TensorBoard file is opened at the first record: a run that logs nothing adds none."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = epath.Path(workdir) / workdir_lib.METRICS_JSONL
    self.tensorboard_dir = paths.join(workdir, "tensorboard")
    self._events_dir = None  # where tensorboardX writes: tensorboard_dir, or a local copy
    self._board = None

  def _tensorboard(self):
    if self._board is None:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      local = paths.is_local(self.tensorboard_dir)
      self._events_dir = (self.tensorboard_dir if local
                          else tempfile.mkdtemp(prefix="swinv2_jax_tensorboard_"))
      self._board = SummaryWriter(self._events_dir)
    return self._board

  def _flush(self) -> None:
    self._board.flush()
    if self._events_dir != self.tensorboard_dir:
      paths.copy_tree(self._events_dir, self.tensorboard_dir)

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    line = json.dumps(record) + "\n"
    if paths.is_local(self.path):
      with open(self.path, "a") as f:
        f.write(line)
    else:
      self.path.write_text((self.path.read_text() if self.path.exists() else "") + line)
    board = self._tensorboard()
    for key, value in record.items():
      if key not in ("stage", "step") and isinstance(value, (int, float)):
        board.add_scalar(f"{record['stage']}/{key}", value, record["step"])
    self._flush()

  def image(self, tag: str, step: int, image: np.ndarray) -> None:
    """An (H, W, 3) uint8 image under `tag` at `step`."""
    if not self.enabled:
      return
    self._tensorboard().add_image(tag, image, step, dataformats="HWC")
    self._flush()


# ---------------------------------------------------------------------------------------------
# Durations and the line a stage logs.
# ---------------------------------------------------------------------------------------------
def duration(seconds: float) -> str:
  """45s, 3m05s, 2h07m, 3d04h."""
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  if seconds < 86400:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def progress_line(record: dict, total: int, eta_stage: float, eta_job: float) -> str:
  """'pretrain step 150/300 (50%), epoch 13.4: loss 0.4321, lr 0.00213, grad norm 0.532 |
  812 images/s, 0.0251 TFLOP/s per device, MFU n/a, input wait 3% | ETA 1m05s, job 3m40s'."""
  step = record["step"]
  epoch = f", epoch {record['epoch']:.3g}" if "epoch" in record else ""
  mfu = f"{record['mfu']:.1%}" if "mfu" in record else "n/a"
  return (f"{record['stage']} step {step}/{total} ({step / total:.0%}){epoch}: loss "
          f"{record['loss']:.4f}, lr {record['lr']:.3g}, grad norm {record['grad_norm']:.3g} | "
          f"{record['images_per_s']:.1f} images/s, {record['tflops_per_device']:.3g} TFLOP/s "
          f"per device, MFU {mfu}, input wait {record['input_wait']:.0%} | ETA "
          f"{duration(eta_stage)}, job {duration(eta_job)}")


class _ClearBar:
  """A log filter that clears the live bar before absl writes a line, so the line does not
  land on top of it; the bar is drawn again at its next update."""

  def __init__(self, bar):
    self.bar = bar

  def filter(self, record) -> bool:
    del record
    self.bar.clear()
    return True


class _Stage:
  """The clocks of the training stage that is running."""

  def __init__(self, name: str, step: int, total: int, batch: int, flops_per_step: float):
    now = time.perf_counter()
    self.name, self.total, self.batch, self.flops_per_step = name, total, batch, flops_per_step
    self.start_step = step
    self.last_time, self.last_step = now, step  # the previous log
    # Where the rate of the ETA is measured from: the first log, once there is one (the first
    # period holds the input pipeline's start-up).
    self.anchor_time, self.anchor_step, self.anchor_aside_s = now, step, 0.0
    self.anchored = False
    self.wait_s = 0.0      # in next(iterator) since the previous log
    self.fetched = 0       # batches taken
    self.aside_s = 0.0     # on evaluations and images since the stage started
    self.period_aside_s = 0.0  # the same, since the previous log


class Progress:
  """The log of a run (process 0 draws the bar; every process logs its lines, as absl does).

  The training loop calls `compiling` and `compiled` around its compile, `start` before its
  first step, `next_batch` for each batch, `log_step` every log period; the evaluator iterates
  `eval_batches`; `run` calls `begin` at each stage and `finish` at the end.
  """

  def __init__(self, config, info=None, stages=(), latest=None, *, stream=None):
    self.config, self.info = config, info
    self.stages = tuple(stages)
    self.latest = dict(latest or {})
    self.stream = stream or sys.stderr
    self.bar_enabled = jax.process_index() == 0 and self.stream.isatty()
    self.job_start = time.perf_counter()
    device = jax.devices()[0]
    self.peak_tflops = accelerators.peak_tflops(device.device_kind)
    self.num_devices = jax.device_count()
    self.eval_images = info.num_eval_examples if info is not None else None
    self.current = None      # the stage that runs: (name, perf_counter at its start)
    self.done = {}           # stage -> (seconds, what it did)
    self.compile_s = {}
    self.last = {}           # stage -> its last step record
    self.eval_durations = []
    self.clock = None        # _Stage of the training stage that runs
    self._bar = None
    self._clear = None

  # -- the job ---------------------------------------------------------------------------
  def begin(self, stage: str) -> None:
    """A stage of `run` starts (the one before it, if any, has ended)."""
    self._end_stage()
    self.current = (stage, time.perf_counter())

  def _end_stage(self) -> None:
    self._close_bar()
    if self.current is None:
      return
    name, start = self.current
    if name in self.compile_s:
      last = self.last.get(name)
      what = f"compile {self.compile_s[name]:.0f}s" + (
          f", to step {last['step']}, last loss {last['loss']:.4f}" if last else "")
    elif name == "eval":
      what = "evaluation"
    else:
      what = "complete before this run: nothing to train"
    self.done[name] = (time.perf_counter() - start, what)
    self.current, self.clock = None, None

  def finish(self, workdir: str, result: dict | None = None) -> str:
    """Logs the end-of-job summary (time per stage, final metrics, where things are) and
    returns it."""
    self._end_stage()
    total = time.perf_counter() - self.job_start
    lines = [f"job done in {duration(total)}: {workdir}"]
    width = max([len(name) for name in self.done] + [4])
    for name, (seconds, what) in self.done.items():
      lines.append(f"  {name:<{width}}  {duration(seconds):>7}  {what}")
    if result:
      lines.append("  final: " + _eval_text(result))
    lines.append("written:")
    for what, path in self._outputs(workdir):
      lines.append(f"  {what:<20} {path}")
    text = "\n".join(lines)
    logging.info("%s", text)
    return text

  def _outputs(self, workdir: str) -> list[tuple[str, str]]:
    out = [("config", paths.join(workdir, workdir_lib.CONFIG_JSON)),
           ("metrics", paths.join(workdir, workdir_lib.METRICS_JSONL)),
           ("TensorBoard", f"{paths.join(workdir, 'tensorboard')} (tensorboard --logdir "
                           f"{paths.join(workdir, 'tensorboard')})")]
    for stage in config_lib.TRAINING_STAGES:
      if stage in self.done:
        out.append((f"{stage} checkpoints", workdir_lib.checkpoint_dir(workdir, stage)))
    if "pretrain" in self.done:
      out.append(("pretrained encoder", workdir_lib.encoder_dir(workdir)))
    if "eval" in self.done:
      out.append(("evaluation", paths.join(workdir, "eval.json")))
    out.append(("report", f"python -m swinv2_jax.report --workdir={workdir}"))
    return out

  # -- a training stage --------------------------------------------------------------------
  def compiling(self, stage: str) -> None:
    s = self.config[stage]
    logging.info("%s: compiling the train step (%s px, global batch %d)...", stage,
                 s.img_size, s.batch_size)

  def compiled(self, summary: dict) -> None:
    """Logs the compile time and the stage's summary table (plan.summarize)."""
    stage = summary["stage"]
    self.compile_s[stage] = summary["compile_s"]
    logging.info("%s: compiled in %.1f s\n%s", stage, summary["compile_s"],
                 plan_lib.format_table(summary, dataset=self.info, estimate=False))

  def start(self, stage: str, step: int) -> None:
    """The loop of a training stage starts at `step` (0, or the checkpoint it resumed)."""
    s = self.config[stage]
    self.clock = _Stage(stage, step, s.steps, s.batch_size,
                        plan_lib.model_flops(self.config, stage, s.batch_size))
    if self.bar_enabled:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=s.steps, initial=step, desc=stage, file=self.stream, leave=False,
                       dynamic_ncols=True, bar_format="{desc} {percentage:3.0f}%|{bar}| "
                       "{n_fmt}/{total_fmt}{postfix}")
      self._clear = _ClearBar(self._bar)
      logging.get_absl_handler().addFilter(self._clear)

  def _close_bar(self) -> None:
    if self._bar is not None:
      logging.get_absl_handler().removeFilter(self._clear)
      self._bar.close()
      self._bar = self._clear = None

  def next_batch(self, iterator):
    """next(iterator), its wait counted as input wait."""
    start = time.perf_counter()
    batch = next(iterator)
    c = self.clock
    c.wait_s += time.perf_counter() - start
    if self._bar is not None and c.fetched:  # the step of the previous batch is done
      self._bar.update(1)
    c.fetched += 1
    return batch

  def log_step(self, step: int, metrics: dict) -> dict:
    """Logs the progress line of a log period ending at `step`; returns its record for
    metrics.jsonl and TensorBoard (the metrics and images_per_s, epoch, tflops_per_device,
    mfu where the accelerator's peak is known, input_wait as a fraction, eta_s)."""
    c = self.clock
    now = time.perf_counter()
    seconds = max(now - c.last_time - c.period_aside_s, 1e-9)  # evaluations left out
    steps = step - c.last_step
    record = dict(stage=c.name, step=step, **metrics)
    record["images_per_s"] = steps * c.batch / seconds
    if self.info is not None:
      record["epoch"] = step * c.batch / self.info.num_train_examples
    tflops = steps * c.flops_per_step / seconds / self.num_devices / 1e12
    record["tflops_per_device"] = tflops
    if self.peak_tflops:
      record["mfu"] = tflops / self.peak_tflops
    record["input_wait"] = min(c.wait_s / seconds, 1.0)
    eta_stage = self._stage_eta(step, now)
    eta_job = eta_stage + self._later_stages_eta(c.flops_per_step / self._seconds_per_step(
        step, now))
    record["eta_s"] = eta_job
    if not c.anchored:  # the rate of later ETAs is measured from here
      c.anchor_time, c.anchor_step, c.anchor_aside_s, c.anchored = now, step, c.aside_s, True
    c.last_time, c.last_step, c.wait_s, c.period_aside_s = now, step, 0.0, 0.0
    self.last[c.name] = record
    logging.info("%s", progress_line(record, c.total, eta_stage, eta_job))
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix_str(f"loss {record['loss']:.4f} | {record['images_per_s']:.0f} "
                                f"images/s | ETA {duration(eta_stage)}, job "
                                f"{duration(eta_job)}")
    return record

  def _seconds_per_step(self, step: int, now: float) -> float:
    c = self.clock
    if c.anchored and step > c.anchor_step:
      seconds = now - c.anchor_time - (c.aside_s - c.anchor_aside_s)
      return max(seconds, 1e-9) / (step - c.anchor_step)
    return max(now - c.anchor_time - c.aside_s, 1e-9) / max(step - c.start_step, 1)

  def _stage_eta(self, step: int, now: float) -> float:
    c = self.clock
    per_step = self._seconds_per_step(step, now)
    evals = self._evals_left(c.name, step)
    return (c.total - step) * per_step + evals * self._eval_seconds(c.flops_per_step / per_step)

  def _evals_left(self, stage: str, step: int) -> int:
    every = self.config[stage].get("eval_every", 0) if stage == "finetune" else 0
    if not every or self.eval_images is None:
      return 0
    per_eval = 2 if self.config.finetune.ema_decay > 0 else 1  # the EMA weights too
    return per_eval * (self.config[stage].steps // every - step // every)

  def _eval_seconds(self, flops_per_s: float) -> float:
    """One evaluation: as long as the last one, or its FLOPs at the training rate."""
    if self.eval_durations:
      return self.eval_durations[-1]
    if self.eval_images is None:
      return 0.0
    return plan_lib.model_flops(self.config, "eval", self.eval_images) / flops_per_s

  def _later_stages_eta(self, flops_per_s: float) -> float:
    """The stages after the running one, from their FLOPs at the rate measured now, each
    training stage with a compile as long as this one's."""
    names = self.stages[self.stages.index(self.clock.name) + 1:] if (
        self.clock.name in self.stages) else ()
    seconds = 0.0
    for name in names:
      if name == "eval":
        per_eval = 2 if self.config.finetune.ema_decay > 0 else 1
        seconds += per_eval * self._eval_seconds(flops_per_s)
        continue
      start = self.latest.get(name) or 0
      s = self.config[name]
      if start >= s.steps:
        continue
      seconds += self.compile_s.get(self.clock.name, 0.0)
      seconds += (s.steps - start) * plan_lib.model_flops(self.config, name, s.batch_size) / (
          flops_per_s)
      seconds += self._evals_left(name, start) * self._eval_seconds(flops_per_s)
    return seconds

  @contextlib.contextmanager
  def aside(self):
    """Times what the loop does besides training steps (an evaluation, TensorBoard images):
    left out of images/s and of the rate the ETA extrapolates."""
    start = time.perf_counter()
    try:
      yield
    finally:
      if self.clock is not None:
        seconds = time.perf_counter() - start
        self.clock.aside_s += seconds
        self.clock.period_aside_s += seconds

  # -- evaluation ----------------------------------------------------------------------------
  def eval_batches(self, batches):
    """Yields the batches of one evaluation (data.EvalIterable); logs where it is every
    EVAL_LINE_S seconds and, at the end, how long it took."""
    total = len(batches)
    images = batches.num_examples
    start = last = time.perf_counter()
    bar = None
    if self.bar_enabled:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=total, desc="eval", file=self.stream, leave=False, dynamic_ncols=True)
    with self.aside():
      for i, batch in enumerate(batches, 1):
        yield batch
        now = time.perf_counter()
        if bar is not None:
          bar.update(1)
        if now - last >= EVAL_LINE_S and i < total:
          last = now
          rate = images * i / total / (now - start)
          logging.info("eval: batch %d/%d, %.1f images/s, ETA %s", i, total, rate,
                       duration((total - i) * (now - start) / i))
    if bar is not None:
      bar.close()
    seconds = time.perf_counter() - start
    self.eval_durations.append(seconds)
    logging.info("eval: %d images in %.1f s (%.1f images/s)", images, seconds,
                 images / max(seconds, 1e-9))


def _eval_text(result: dict) -> str:
  text = (f"top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f} on "
          f"{result['num_examples']:,} images")
  if "best_top1" in result:
    text += f" (best top-1 {result['best_top1']:.4f} at step {result['best_step']})"
  if "ema_top1" in result:
    text += f"; EMA top-1 {result['ema_top1']:.4f}"
  return text


# ---------------------------------------------------------------------------------------------
# SimMIM reconstructions.
# ---------------------------------------------------------------------------------------------
class Reconstructions:
  """Masked input, reconstruction (the model's pixels in the masked cells, the input's
  elsewhere) and original, for the first `count` images of a SimMIM batch, in [0, 1].

  With `pretrain.norm_target_window` the model predicts locally normalised pixels (paper 3.4's
  SimMIM targets); they are turned back into pixels with the original's own window mean and
  deviation (simmim.local_statistics) to be shown."""

  def __init__(self, config, graphdef, layout, count: int = 4):
    self.count = count
    self.layout = layout
    self.mean = np.asarray(config.data.mean, np.float32)
    self.std = np.asarray(config.data.std, np.float32)
    patch, window = config.model.patch_size, config.pretrain.norm_target_window

    def reconstruct(params, images, mask):
      reconstruction = nnx.merge(graphdef, params)(images, mask)  # rng None: no drop path
      if window:
        mean, std = simmim.local_statistics(images, window)
        reconstruction = reconstruction * std + mean
      pixels = jnp.repeat(jnp.repeat(mask, patch, axis=1), patch, axis=2)[..., None]
      return images * (1 - pixels) + reconstruction * pixels, pixels

    self._reconstruct = jax.jit(reconstruct, out_shardings=layout.replicated())

  def __call__(self, params, batch: dict) -> dict[str, np.ndarray]:
    """{'masked', 'reconstruction', 'original'}: (count, H, W, 3) in [0, 1], from process 0's
    `batch` (every process calls this: the images are broadcast from process 0)."""
    images, mask = multihost_utils.broadcast_one_to_all(
        (np.asarray(batch["image"][:self.count]), np.asarray(batch["mask"][:self.count])))
    put = lambda x: jax.make_array_from_process_local_data(self.layout.replicated(), x)
    with jax.set_mesh(self.layout.mesh):  # per-group weight gathering, as in training
      filled, pixels = jax.device_get(self._reconstruct(params, put(images), put(mask)))
    to_01 = lambda x: np.clip(x * self.std + self.mean, 0.0, 1.0)
    original = to_01(images)
    return dict(masked=np.where(pixels > 0, 0.5, original), reconstruction=to_01(filled),
                original=original)


def image_grid(panels: dict[str, np.ndarray], min_size: int = 128) -> np.ndarray:
  """One uint8 (H, W, 3) image: a row per example, the panels side by side, 2 px apart,
  enlarged (nearest) to at least `min_size` px per panel so small inputs stay visible."""
  columns = list(panels.values())
  count, h, w, _ = columns[0].shape
  scale = max(1, -(-min_size // h))
  gap = 2
  grid = np.ones((count * (h * scale + gap) - gap, len(columns) * (w * scale + gap) - gap, 3),
                 np.float32)
  for row in range(count):
    for col, images in enumerate(columns):
      tile = np.repeat(np.repeat(images[row], scale, axis=0), scale, axis=1)
      top, left = row * (h * scale + gap), col * (w * scale + gap)
      grid[top:top + h * scale, left:left + w * scale] = tile
  return (grid * 255).round().astype(np.uint8)


def reconstruction_images(config, trainer, layout, writer: MetricWriter, progress: Progress):
  """The `(params, batch, step)` callable that writes TensorBoard's reconstructions every
  `pretrain.image_every` steps, or None where the stage draws none."""
  every = config.pretrain.get("image_every", 0)
  if trainer.task.name != "pretrain" or not every:
    return None
  reconstructions = Reconstructions(config, trainer.graphdef, layout)

  def write(params, batch: dict, step: int) -> None:
    if step % every == 0:
      with progress.aside():
        writer.image("pretrain/reconstruction", step,
                     image_grid(reconstructions(params, batch)))

  return write
