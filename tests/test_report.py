"""`python -m swinv2_jax.report`: the pictures of a tiny run (every stage, test_train.py's
tiny model, run as test_progress.py runs it), their sizes and content, index.html, and what a
workdir without some stage gets.
"""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from swinv2_jax import data as data_lib
from swinv2_jax import report
from swinv2_jax.models import windows as win

from helpers import ROOT
from test_progress import tiny_job
from test_train import tiny_config

# (width, height) of each picture: report.CURVES_SIZE etc. at report.DPI.
SIZES = {"curves.png": (1200, 650), "reconstructions.png": (1200, 500),
         "position_bias.png": (1000, 800)}


def _report(workdir: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  return subprocess.run([sys.executable, "-m", "swinv2_jax.report", f"--workdir={workdir}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny run of every stage, then the report's command on it."""
  workdir = str(tmp_path_factory.mktemp("run") / "w")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  data_lib.dataset_info(tiny_config(data_dir).data)  # built here; the run only reads it
  job = tiny_job(workdir, data_dir)
  assert job.returncode == 0, job.stderr[-4000:]
  result = _report(workdir)
  assert result.returncode == 0, result.stderr[-4000:]
  return dict(workdir=workdir, stdout=result.stdout)


def test_the_report_draws_every_picture_at_its_size(run):
  out = os.path.join(run["workdir"], "report")
  for name, size in SIZES.items():
    assert f"{name}: {os.path.join(out, name)}" in run["stdout"]
    with Image.open(os.path.join(out, name)) as image:
      assert image.format == "PNG" and image.size == size
      pixels = np.asarray(image.convert("L"), np.float32)
    # Drawn on: far from one flat colour, and with dark ink (axes, text, images).
    assert pixels.std() > 10 and (pixels < 100).mean() > 0.01, name


def test_index_html_shows_the_pictures_the_config_and_the_evaluation(run):
  out = os.path.join(run["workdir"], "report")
  with open(os.path.join(out, "index.html")) as f:
    page = f.read()
  assert sorted(re.findall(r"<img src='([^']+)'", page)) == sorted(SIZES)
  assert "&quot;embed_dim&quot;: 16" in page  # config.json, escaped
  assert "&quot;top1&quot;" in page and "&quot;num_examples&quot;: 360" in page  # eval.json


def test_reconstructions_keep_the_visible_pixels_and_grey_out_the_masked_ones(run):
  config = report.read_config(run["workdir"])
  state_dir, step = report.latest_state_dir(run["workdir"], "pretrain")
  assert step == 8
  panels = report.eval_panels(config, report.restore_params(state_dir), count=3)
  masked, filled, original = panels["masked"], panels["reconstruction"], panels["original"]
  assert masked.shape == filled.shape == original.shape == (3, 32, 32, 3)
  hidden = masked == 0.5
  # digits' masks: 60% of the 16 8x8 cells, 10 of 16 (the odd visible pixel may be 0.5 too).
  assert 0.55 < hidden.mean() < 0.75
  np.testing.assert_allclose(filled[~hidden], original[~hidden], atol=1e-6)
  assert np.abs(filled[hidden] - original[hidden]).mean() > 1e-3  # the model's own pixels


def test_the_position_bias_is_the_modules_bias_at_each_offset(run):
  """bias_table reads the (heads, N, N) bias back through the relative-position index: it is
  16 sigmoid of the meta MLP at each offset's log-spaced coordinates (paper 3.3)."""
  config = report.read_config(run["workdir"])
  state_dir, _ = report.latest_state_dir(run["workdir"], "finetune")
  weights = report.first_block_weights(
      report.restore_params(state_dir, ("params", "levels", "0")))
  cpb = report.first_block_bias(config, "finetune")
  assert cpb.window == (4, 4) and cpb.pretrained_window == (4, 4)
  table = report.bias_table(cpb, weights)
  coords = win.relative_coords_table(cpb.window, cpb.pretrained_window)  # (7, 7, 2)
  hidden = np.maximum(coords @ weights["fc1"]["kernel"] + weights["fc1"]["bias"], 0.0)
  expected = 16.0 / (1.0 + np.exp(-(hidden @ weights["fc2"]["kernel"])))
  assert table.shape == (7, 7, 1)
  np.testing.assert_allclose(table, expected, rtol=1e-5, atol=1e-5)


def test_a_larger_fine_tuning_window_shows_where_fine_tuning_starts(run):
  """At another fine-tuning window the pretrained MLP is drawn there too, at coordinates
  normalised by the pretraining window (paper 3.3): the offsets both windows have keep their
  bias, the new ones extrapolate it."""
  config = report.read_config(run["workdir"])
  # Level 1 of a 64 px input: a 16x16 map in 8x8 windows, coordinates of the 4x4 window.
  config.finetune.img_size, config.finetune.window_size = 64, 8
  config.finetune.pretrained_window_sizes = 4
  encoder = os.path.join(run["workdir"], "pretrain", "encoder")
  weights = report.first_block_weights(report.restore_params(encoder, ("levels", "0")))
  rows = report.position_bias_rows(config, weights, weights)
  assert [table.shape for _, table in rows] == [(7, 7, 1), (15, 15, 1), (15, 15, 1)]
  assert rows[1][0] == ("pretrained, 8x8 window, coordinates of 4x4 (fine-tuning starts "
                        "here)")
  np.testing.assert_allclose(rows[1][1][4:11, 4:11], rows[0][1], rtol=1e-6)


def test_a_workdir_without_pretraining_gets_the_rest(run, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(run["workdir"], workdir)
  shutil.rmtree(os.path.join(workdir, "pretrain"))
  shutil.rmtree(os.path.join(workdir, "report"))
  done = report.write_report(workdir)
  assert done["reconstructions.png"] == (
      f"skipped: no checkpoint in {os.path.join(workdir, 'pretrain', 'checkpoints')}")
  for name in ("curves.png", "position_bias.png", "index.html"):
    assert os.path.exists(done[name]), name
  with Image.open(done["position_bias.png"]) as image:
    assert image.size == SIZES["position_bias.png"]  # the fine-tuned row alone
  with open(done["index.html"]) as f:
    page = f.read()
  assert "skipped: no checkpoint in" in page and "reconstructions.png'" not in page


def test_a_folder_that_is_not_a_run_is_one_error_line(tmp_path):
  result = _report(str(tmp_path))
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path / 'config.json'} does not exist: --workdir must be the folder of a "
      "run")
