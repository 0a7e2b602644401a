"""hf-hub:<owner>/<name> weight ids (swinv2_jax/weights/hub.py) through the real
huggingface_hub, from a Hub cache the tests build (tests/hub_cache.py): no network."""

import os
import re
import socket

import pytest

from swinv2_jax import config as config_lib
from swinv2_jax import errors
from swinv2_jax import loading
from swinv2_jax import train
from swinv2_jax import trainer as trainer_lib
from swinv2_jax import weights
from swinv2_jax.weights import hub

from hub_cache import offline_cache, safetensors_bytes, write_hub_cache
from parity_fixtures import FIXTURE_DIR, abstract_model, config, state
from test_loading import assert_same_tree
from test_train import tiny_config

# Not a preset name, so no architecture is implied: the tiny model's weights under timm's owner.
TINY_ID = "hf-hub:timm/swinv2_digits_tiny.test"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_hub_ids_load_from_the_cache_offline(tmp_path, monkeypatch):
  cfg = tiny_config(str(tmp_path / "unused"))
  model = trainer_lib.build_classifier(cfg, "finetune", 10)
  want = trainer_lib.split_params(model)[1]
  cache = tmp_path / "hub"
  snapshot = write_hub_cache(cache, "timm/swinv2_digits_tiny.test", {
      "model.safetensors": safetensors_bytes(weights.to_pytorch_state_dict(model, "timm"))})
  # timm's repositories also ship pytorch_model.bin: the fallback, read without torch.
  with open(os.path.join(FIXTURE_DIR, "swinv2_shift_clamp.pth"), "rb") as f:
    write_hub_cache(cache, "timm/swinv2_shift_clamp.test", {"pytorch_model.bin": f.read()})
  offline_cache(monkeypatch, cache)

  assert hub.fetch(TINY_ID) == os.path.join(snapshot, "model.safetensors")
  layout = trainer_lib.make_layout(cfg)
  cfg.finetune.init, cfg.finetune.drop_head, cfg.eval_checkpoint = TINY_ID, False, TINY_ID
  assert_same_tree(loading.finetune_init_params(cfg, str(tmp_path), 10, layout), want)
  params, ema, source, _ = loading.load_eval_params(cfg, str(tmp_path), 10, layout)
  assert_same_tree(params, want)
  assert ema is None and source == TINY_ID

  from_bin = weights.load_pytorch_weights(abstract_model(config("shift_clamp")),
                                          "hf-hub:timm/swinv2_shift_clamp.test")
  from_npz = weights.load_pytorch_weights(abstract_model(config("shift_clamp")),
                                          state("shift_clamp", "official"))
  assert_same_tree(trainer_lib.split_params(from_bin)[1],
                   trainer_lib.split_params(from_npz)[1])

  with pytest.raises(hub.HubError) as info:  # offline, and not in this cache
    hub.fetch("hf-hub:timm/swinv2_tiny_window8_256.ms_in1k")
  message = errors.message(info.value)
  assert message == (
      f"hf-hub:timm/swinv2_tiny_window8_256.ms_in1k: model.safetensors or pytorch_model.bin is "
      f"not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set: fetch it once with "
      "network access, or set HF_HUB_CACHE to a cache that holds it")


def test_ids_that_do_not_fit_are_refused_before_anything_is_fetched(data_dir, tmp_path,
                                                                     monkeypatch):
  offline_cache(monkeypatch, tmp_path / "empty")  # a fetch would fail with another message
  base = "hf-hub:timm/swinv2_base_window8_256.ms_in1k"
  architecture = (r" holds a swinv2_base_window8_256 \(embed_dim 128, depths \(2, 2, 18, 2\), "
                  r"num_heads \(4, 8, 16, 32\)\) but config.model.\* builds embed_dim 16, depths "
                  r"\(2, 2\), num_heads \(1, 2\): set config.model.name=swinv2_base_window8_256 "
                  r"and leave config.model.embed_dim, depths, num_heads unset$")
  cases = [
      ("finetune.init", base, architecture),
      ("eval_checkpoint", base, architecture),
      ("finetune.init", "hf-hub:timm/resnet50.a1_in1k", ": not one of timm's SwinV2 models"),
      ("finetune.init", "hf-hub:timm/swinv2_cr_tiny_ns_224.sw_in1k",
       ": not one of timm's SwinV2 models"),
      ("eval_checkpoint", "hf-hub:swinv2 tiny", ": not a Hugging Face Hub id; expected "
       "hf-hub:<owner>/<name>"),
  ]
  workdir = tmp_path / "run"
  for key, source, message in cases:
    cfg = tiny_config(data_dir)
    if key == "finetune.init":
      cfg.stages, cfg.finetune.init = ("finetune", "eval"), source
    else:
      cfg.eval_only, cfg.eval_checkpoint = True, source
    with pytest.raises(config_lib.ConfigError) as info:
      train.run(cfg, str(workdir))
    text = str(info.value)
    assert text.startswith(f"config.{key}: {source}") and "\n" not in text, text
    assert re.search(message, text), text
    assert not workdir.exists()


def test_an_unreachable_hub_is_one_line(tmp_path, monkeypatch):
  """No network and not in the cache. huggingface_hub retries a failed connection for about
  25 s (its own backoff, not configurable) before it gives up."""
  with socket.socket() as s:  # a port that nothing listens on: connections are refused
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
  monkeypatch.setenv("HF_HUB_OFFLINE", "0")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
  with pytest.raises(hub.HubError) as info:
    hub.fetch(TINY_ID)
  message = errors.message(info.value)
  assert "\n" not in message and errors.is_user_error(info.value)
  assert message.startswith(f"{TINY_ID}: cannot reach http://127.0.0.1:{port} (")
  assert message.endswith(f"and the Hugging Face cache {tmp_path / 'empty'} does not hold it: "
                          "connect once, or set HF_HUB_OFFLINE=1 and HF_HUB_CACHE to a cache "
                          "that holds it")
