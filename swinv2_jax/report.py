"""Pictures of a run: `python -m swinv2_jax.report --workdir=DIR` writes DIR/report/.

- curves.png: loss and lr of each training stage, and the evaluations' top-1 (and top-5, and
  the EMA weights') while fine-tuning, with the final one of eval.json (metrics.jsonl).
- reconstructions.png: SimMIM on eval images, from the latest pretraining checkpoint: masked
  input, reconstruction (the model's pixels in the masked cells), original.
- position_bias.png: the continuous position bias of level 1's first block (paper 3.3), a
  few heads, over every relative offset of a window: the pretrained bias MLP at the
  pretraining window, the same MLP at the fine-tuning window (what fine-tuning starts from: the
  transfer log-spaced coordinates make possible) and the fine-tuned MLP there.
- index.html: the pictures, the run's config.json and eval.json.

Whatever the workdir lacks (a stage that did not run, a data set that is not on this machine)
is skipped with a line that says why; the rest is drawn. Runs on one device (a CPU is fine):
checkpoints of any mesh are restored whole onto it, parameters only.
"""

from __future__ import annotations

import html
import io
import json
import sys

import jax
import matplotlib
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app
from absl import flags
from absl import logging
from etils import epath
from flax import nnx

from swinv2_jax import checkpointing
from swinv2_jax import config as config_lib
from swinv2_jax import data as data_lib
from swinv2_jax import errors
from swinv2_jax import logs
from swinv2_jax import paths
from swinv2_jax import plan as plan_lib
from swinv2_jax import progress as progress_lib
from swinv2_jax import sharding as sharding_lib
from swinv2_jax import trainer as trainer_lib
from swinv2_jax import workdir as workdir_lib
from swinv2_jax.models import layers
from swinv2_jax.models import windows as win
from swinv2_jax.models.swinv2 import SwinTransformerV2

matplotlib.use("Agg")  # files only, no display
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

DPI = 100
# Figure sizes in inches at DPI: the PNGs are 1200x650, 1200x500 and 1000x800 pixels.
CURVES_SIZE, RECONSTRUCTIONS_SIZE, POSITION_BIAS_SIZE = (12.0, 6.5), (12.0, 5.0), (10.0, 8.0)
NUM_IMAGES = 8   # eval images in reconstructions.png
NUM_HEADS = 4    # heads of level 1 in position_bias.png (at most)
MASK_SEED = 0    # the masks drawn for reconstructions.png


# ---------------------------------------------------------------------------------------------
# What the workdir holds.
# ---------------------------------------------------------------------------------------------
def read_config(workdir: str) -> ml_collections.ConfigDict:
  saved = workdir_lib.read_config(workdir)
  if saved is None:
    raise errors.UserError(f"{paths.join(workdir, workdir_lib.CONFIG_JSON)} does not exist: "
                           "--workdir must be the folder of a run")
  return ml_collections.ConfigDict(saved)


def read_records(workdir: str) -> list[dict]:
  """metrics.jsonl's records (a line cut by a kill is left out)."""
  path = epath.Path(workdir) / workdir_lib.METRICS_JSONL
  records = []
  for line in (path.read_text().splitlines() if path.exists() else []):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def _int_keys(tree):
  """Orbax gives list positions back as '0', '1', ...; the model's pure dicts use ints."""
  if not isinstance(tree, dict):
    return tree
  return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v)
          for k, v in tree.items()}


def restore_params(directory: str, keys: tuple[str, ...] = ("params",)):
  """The subtree at `keys` of an orbax tree (a checkpoint's `state` item, or a parameter
  directory), alone, restored onto the first device whatever mesh wrote it."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.PyTreeCheckpointer() as ckptr:
    metadata = ckptr.metadata(paths.absolute(directory))
    subtree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
    for key in keys:
      subtree = subtree[key]
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          subtree)
    for key in reversed(keys):
      target = {key: target}
    restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)
    restored = ckptr.restore(paths.absolute(directory), args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  for key in keys:
    restored = restored[key]
  return _int_keys(restored)


def latest_state_dir(workdir: str, stage: str) -> tuple[str, int] | None:
  """(the `state` item of the stage's latest checkpoint, its step), or None."""
  directory = workdir_lib.checkpoint_dir(workdir, stage)
  step = checkpointing.latest_step(directory)
  return None if step is None else (paths.join(directory, str(step), "state"), step)


def _save(figure, path: str) -> None:
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=DPI)
  plt.close(figure)
  epath.Path(path).write_bytes(buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# curves.png
# ---------------------------------------------------------------------------------------------
def draw_curves(records: list[dict], final: dict | None, path: str) -> None:
  """Loss and lr per training stage (columns), evaluations on the right."""
  figure = plt.figure(figsize=CURVES_SIZE, layout="constrained")
  grid = figure.add_gridspec(2, 3)
  for col, stage in enumerate(config_lib.TRAINING_STAGES):
    rows = [r for r in records if r.get("stage") == stage]
    for row, (key, label) in enumerate((("loss", "loss"), ("lr", "learning rate"))):
      ax = figure.add_subplot(grid[row, col])
      ax.set_title(f"{stage}: {label}")
      ax.set_xlabel("step")
      if rows:
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], lw=1.2)
        ax.grid(alpha=0.3)
      else:
        ax.text(0.5, 0.5, f"no {stage} records", ha="center", va="center",
                transform=ax.transAxes)
  ax = figure.add_subplot(grid[:, 2])
  ax.set_title("evaluation (test split)")
  ax.set_xlabel("fine-tuning step")
  evals = [r for r in records if r.get("stage") == "eval"]
  for key, style in (("top1", "-o"), ("top5", "--o"), ("ema_top1", "-s")):
    points = [(r["step"], r[key]) for r in evals if key in r]
    if points:
      ax.plot(*zip(*points), style, ms=3, lw=1.2, label=key.replace("_", " "))
  if final:
    ax.axhline(final["top1"], color="k", lw=0.8, ls=":",
               label=f"final top1 {final['top1']:.3f}")
  if evals or final:
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
  else:
    ax.text(0.5, 0.5, "no evaluations", ha="center", va="center", transform=ax.transAxes)
  _save(figure, path)


# ---------------------------------------------------------------------------------------------
# reconstructions.png
# ---------------------------------------------------------------------------------------------
def one_device_layout() -> sharding_lib.Layout:
  return sharding_lib.Layout(sharding_lib.make_mesh(("data",), (-1,), jax.devices()[:1]),
                             zero=0, rules=((".*", "replicate"),))


def eval_panels(config, params, count: int = NUM_IMAGES) -> dict[str, np.ndarray]:
  """Reconstructions (progress.Reconstructions) of the first `count` eval images, at the
  pretraining size, under masks drawn as pretraining draws them (seed MASK_SEED)."""
  p = config.pretrain
  batch = next(iter(data_lib.build_eval_iterator(config.data, image_size=p.img_size,
                                                 global_batch_size=count)))
  rng = np.random.default_rng(MASK_SEED)
  mask = np.stack([data_lib.simmim_mask(rng, p.img_size, p.mask_patch_size,
                                        config.model.patch_size, p.mask_ratio)
                   for _ in range(count)])
  graphdef, _ = trainer_lib.split_params(nnx.eval_shape(lambda: trainer_lib.build_simmim(config)))
  reconstructions = progress_lib.Reconstructions(config, graphdef, one_device_layout(), count)
  return reconstructions(params, dict(image=batch["image"], mask=mask))


def draw_reconstructions(panels: dict[str, np.ndarray], step: int, path: str) -> None:
  count = len(panels["original"])
  figure, axes = plt.subplots(3, count, figsize=RECONSTRUCTIONS_SIZE, layout="constrained",
                              squeeze=False)
  titles = dict(masked="masked input", reconstruction="reconstruction", original="original")
  for row, (name, images) in enumerate(panels.items()):
    for col in range(count):
      ax = axes[row, col]
      ax.imshow(images[col], interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
    axes[row, 0].set_ylabel(titles[name])
  figure.suptitle(f"SimMIM on eval images, pretraining checkpoint at step {step}")
  _save(figure, path)


# ---------------------------------------------------------------------------------------------
# position_bias.png
# ---------------------------------------------------------------------------------------------
def first_block_bias(config, stage: str) -> layers.ContinuousPositionBias:
  """The CPB module of level 1's first block as the stage's model builds it (its window,
  clamped to the map, and the window its coordinates are normalised by)."""
  model = nnx.eval_shape(lambda: SwinTransformerV2(**config_lib.model_args(config, stage),
                                                   num_classes=0))
  level = model.levels[0]
  group = level.groups if level.groups is not None else level.tail
  cpb = group.blocks[0].attn.cpb_mlp
  heads = cpb.fc2.kernel.shape[-1]
  return layers.ContinuousPositionBias(cpb.window, cpb.pretrained_window, heads,
                                       rngs=nnx.Rngs(0))


def first_block_weights(level: dict) -> dict:
  """The CPB weights of the first block in the parameters of level 1 (`levels[0]`)."""
  if "groups" in level:  # stacked over the scanned groups: the first group's
    return jax.tree.map(lambda x: np.asarray(x)[0],
                        level["groups"]["blocks"][0]["attn"]["cpb_mlp"])
  return jax.tree.map(np.asarray, level["tail"]["blocks"][0]["attn"]["cpb_mlp"])


def bias_table(cpb: layers.ContinuousPositionBias, weights: dict) -> np.ndarray:
  """(2Wh-1, 2Ww-1, heads): the bias the module adds for each relative offset (16*sigmoid of
  the meta MLP), read back from its (heads, N, N) output through the relative-position index
  (every offset occurs in a window)."""
  graphdef, state = nnx.split(cpb)
  nnx.replace_by_pure_dict(state, weights)
  bias = np.asarray(nnx.merge(graphdef, state)())  # (heads, N, N)
  wh, ww = cpb.window
  table = np.zeros(((2 * wh - 1) * (2 * ww - 1), bias.shape[0]), np.float32)
  table[np.asarray(win.relative_position_index(cpb.window)).ravel()] = (
      bias.reshape(bias.shape[0], -1).T)
  return table.reshape(2 * wh - 1, 2 * ww - 1, -1)


def _window_text(cpb) -> str:
  (wh, ww), (ph, pw) = cpb.window, cpb.pretrained_window
  text = f"{wh}x{ww} window"
  return text + (f", coordinates of {ph}x{pw}" if (ph, pw) not in ((0, 0), (wh, ww)) else "")


def position_bias_rows(config, pretrained: dict | None, finetuned: dict | None):
  """[(title, table)] for the picture: the pretrained MLP at the pretraining and fine-tuning
  windows, the fine-tuned MLP at the fine-tuning window; the second is left out where its
  coordinates are those of the first."""
  rows = []
  at_pretrain = first_block_bias(config, "pretrain")
  at_finetune = first_block_bias(config, "finetune")
  coords = lambda cpb: win.relative_coords_table(cpb.window, cpb.pretrained_window)
  same = np.array_equal(coords(at_pretrain), coords(at_finetune))
  if pretrained is not None:
    rows.append((f"pretrained, {_window_text(at_pretrain)}"
                 + (" (= fine-tuning's)" if same else ""), bias_table(at_pretrain, pretrained)))
    if not same:
      rows.append((f"pretrained, {_window_text(at_finetune)} (fine-tuning starts here)",
                   bias_table(at_finetune, pretrained)))
  if finetuned is not None:
    rows.append((f"fine-tuned, {_window_text(at_finetune)}", bias_table(at_finetune, finetuned)))
  return rows


def draw_position_bias(rows, path: str) -> None:
  heads = min(rows[0][1].shape[-1], NUM_HEADS)
  figure, axes = plt.subplots(len(rows), heads, figsize=POSITION_BIAS_SIZE, layout="constrained",
                              squeeze=False)
  low = min(float(table[..., :heads].min()) for _, table in rows)
  high = max(float(table[..., :heads].max()) for _, table in rows)
  image = None
  for r, (title, table) in enumerate(rows):
    dh, dw = (table.shape[0] - 1) // 2, (table.shape[1] - 1) // 2
    for h in range(heads):
      ax = axes[r, h]
      image = ax.imshow(table[..., h], vmin=low, vmax=high, cmap="viridis",
                        extent=(-dw - 0.5, dw + 0.5, dh + 0.5, -dh - 0.5))
      ax.set_title(f"head {h + 1}" if r == 0 else "", fontsize=10)
      ax.set_xlabel("offset x" if r == len(rows) - 1 else "")
    axes[r, 0].set_ylabel(f"{title}\noffset y", fontsize=9)
  figure.colorbar(image, ax=axes, shrink=0.8, label="bias added to the logit (16 sigmoid)")
  figure.suptitle("Continuous position bias, level 1, first block (paper 3.3)")
  _save(figure, path)


# ---------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------
def write_report(workdir: str) -> dict[str, str]:
  """Draws what the workdir allows into WORKDIR/report/; returns {picture: file, or why it
  was skipped}, the 'skipped: ...' lines also logged."""
  config = read_config(workdir)
  out = paths.join(workdir, "report")
  paths.makedirs(out)
  done = {}

  def skip(name: str, why: str) -> None:
    done[name] = f"skipped: {why}"
    logging.info("report: %s skipped: %s", name, why)

  eval_path = epath.Path(workdir) / "eval.json"
  final = json.loads(eval_path.read_text()) if eval_path.exists() else None
  records = read_records(workdir)
  if records or final:
    draw_curves(records, final, paths.join(out, "curves.png"))
    done["curves.png"] = paths.join(out, "curves.png")
  else:
    skip("curves.png", f"{paths.join(workdir, workdir_lib.METRICS_JSONL)} holds no records")

  pretrain = latest_state_dir(workdir, "pretrain")
  pretrained_params = None
  if pretrain is None:
    skip("reconstructions.png",
         f"no checkpoint in {workdir_lib.checkpoint_dir(workdir, 'pretrain')}")
  else:
    pretrained_params = restore_params(pretrain[0])
    try:
      panels = eval_panels(config, pretrained_params)
    except data_lib.DatasetNotFoundError as e:
      skip("reconstructions.png", f"the eval images are not on this machine ({e})")
    else:
      draw_reconstructions(panels, pretrain[1], paths.join(out, "reconstructions.png"))
      done["reconstructions.png"] = paths.join(out, "reconstructions.png")

  # Level 1 alone: a G checkpoint's parameters would not fit a laptop.
  encoder = workdir_lib.encoder_dir(workdir)
  pretrained = None
  if epath.Path(encoder).is_dir():
    pretrained = first_block_weights(restore_params(encoder, ("levels", "0")))
  elif pretrained_params is not None:
    pretrained = first_block_weights(pretrained_params["encoder"]["levels"][0])
  finetune = latest_state_dir(workdir, "finetune")
  finetuned = None if finetune is None else first_block_weights(
      restore_params(finetune[0], ("params", "levels", "0")))
  if pretrained is None and finetuned is None:
    skip("position_bias.png", f"neither {encoder} nor a checkpoint in "
         f"{workdir_lib.checkpoint_dir(workdir, 'finetune')}")
  else:
    draw_position_bias(position_bias_rows(config, pretrained, finetuned),
                       paths.join(out, "position_bias.png"))
    done["position_bias.png"] = paths.join(out, "position_bias.png")

  index = paths.join(out, "index.html")
  epath.Path(index).write_text(index_html(workdir, config, done, final))
  done["index.html"] = index
  return done


def index_html(workdir: str, config, done: dict[str, str], final: dict | None) -> str:
  """The page: each picture (or why it is missing), then config.json and eval.json."""
  e = html.escape
  parts = [f"<!doctype html><meta charset='utf-8'><title>{e(workdir)}</title>",
           "<style>body{font-family:sans-serif;max-width:1250px;margin:auto}"
           "img{max-width:100%}pre{background:#f4f4f4;padding:8px;overflow:auto}</style>",
           f"<h1>{e(workdir)}</h1><p>{e(plan_lib.describe_model(config))}</p>"]
  for name in ("curves.png", "reconstructions.png", "position_bias.png"):
    parts.append(f"<h2>{e(name)}</h2>")
    if done.get(name, "").startswith("skipped"):
      parts.append(f"<p>{e(done[name])}</p>")
    else:
      parts.append(f"<img src='{e(name)}' alt='{e(name)}'>")
  parts.append("<h2>eval.json</h2><pre>"
               + e(json.dumps(final, indent=2) if final else "(none)") + "</pre>")
  parts.append("<h2>config.json</h2><pre>" + e(json.dumps(config.to_dict(), indent=2))
               + "</pre>")
  return "\n".join(parts) + "\n"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: the report takes --workdir=DIR")
  logs.quiet_other_libraries()
  try:
    done = write_report(flags.FLAGS.workdir)
  except errors.UserError as e:  # not a run's folder: one line, no traceback
    errors.report(e)
    sys.exit(errors.EXIT_USER_ERROR)
  for name, where in done.items():
    print(f"{name}: {where}")


if __name__ == "__main__":
  # Defined here, not at import: the report is imported by tests beside main's --workdir.
  flags.DEFINE_string("workdir", None, "The run's --workdir; the report goes to "
                      "WORKDIR/report/.")
  flags.mark_flag_as_required("workdir")
  logging.set_verbosity(logging.INFO)
  app.run(main)
