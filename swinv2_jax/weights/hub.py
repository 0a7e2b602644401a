"""Weights by name: `hf-hub:<owner>/<repo>` ids (timm's: `hf-hub:timm/swinv2_tiny_window8_256.
ms_in1k`), fetched with `huggingface_hub` into its cache.

The repository's `model.safetensors` is fetched (timm's SwinV2 repositories ship it next to
`pytorch_model.bin`, which is the fallback); `readers` then reads the local file like any
other. huggingface_hub's own environment applies (HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT,
HF_TOKEN); it reads it once, at import, so those three are read again at each fetch and a value
set later in the process (a notebook, a test) counts too.
"""

from __future__ import annotations

import os
import re

from swinv2_jax import errors

PREFIX = "hf-hub:"
FILENAMES = ("model.safetensors", "pytorch_model.bin")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(errors.UserError):
  """An hf-hub id that cannot be resolved to a weights file."""


def is_hub_id(source) -> bool:
  return isinstance(source, str) and source.startswith(PREFIX)


def repo_id(source: str) -> str:
  """'hf-hub:timm/swinv2_tiny_window8_256.ms_in1k' -> 'timm/swinv2_tiny_window8_256.ms_in1k'."""
  repo = source[len(PREFIX):]
  if not _REPO_ID.match(repo):
    raise HubError(f"{source}: not a Hugging Face Hub id; expected hf-hub:<owner>/<name>, e.g. "
                   "hf-hub:timm/swinv2_tiny_window8_256.ms_in1k")
  return repo


def timm_model_name(source: str) -> str | None:
  """The timm model name of a timm id ('swinv2_tiny_window8_256'); None for other owners.

  timm names its repositories `<model name>.<pretrained tag>`, and our presets carry timm's
  model names, so the name says which preset the weights fit."""
  owner, name = repo_id(source).split("/")
  if owner != "timm":
    return None
  model = name.split(".", 1)[0]
  # timm's other SwinV2 (swin_transformer_v2_cr.py) has other parameters and names.
  if not model.startswith("swinv2_") or model.startswith("swinv2_cr_"):
    raise HubError(f"{source}: not one of timm's SwinV2 models (swinv2_<size>_window..., as in "
                   "swinv2_jax.models.list_models()); this project loads those only")
  return model


def _env_flag(name: str) -> bool:
  return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def fetch(source: str) -> str:
  """The local path of the hub id's weights file, from the cache or downloaded into it.

  Raises HubError, one line, where the file is in neither (offline, no network, no such
  repository)."""
  repo = repo_id(source)
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors as hub_errors  # pylint: disable=g-import-not-at-top
  offline = (_env_flag("HF_HUB_OFFLINE") if "HF_HUB_OFFLINE" in os.environ
             else constants.HF_HUB_OFFLINE)
  cache_dir = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
  endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
  missing = None
  for filename in FILENAMES:
    try:
      return huggingface_hub.hf_hub_download(repo, filename, cache_dir=cache_dir,
                                             endpoint=endpoint, local_files_only=offline)
    except hub_errors.RemoteEntryNotFoundError:  # the repository has no such file: the next
      continue
    except hub_errors.LocalEntryNotFoundError as e:
      missing = e
      if not offline:  # the Hub is unreachable: the next file would be too (after retries)
        break
    except hub_errors.RepositoryNotFoundError as e:  # GatedRepoError included
      raise HubError(f"{source}: the Hub ({endpoint}) has no repository {repo} that this "
                     f"token may read ({type(e).__name__}); check the id") from e
    except hub_errors.HfHubHTTPError as e:
      raise HubError(f"{source}: {endpoint} answered {type(e).__name__}: "
                     f"{str(e).splitlines()[0]}") from e
  if missing is None:
    raise HubError(f"{source}: the repository has none of {', '.join(FILENAMES)}")
  names = " or ".join(FILENAMES)
  if offline:
    raise HubError(f"{source}: {names} is not in the Hugging Face cache {cache_dir} and "
                   "HF_HUB_OFFLINE is set: fetch it once with network access, or set "
                   "HF_HUB_CACHE to a cache that holds it") from missing
  cause = missing.__cause__ or missing
  raise HubError(f"{source}: cannot reach {endpoint} ({type(cause).__name__}: "
                 f"{str(cause).splitlines()[0] if str(cause) else 'no answer'}) and the Hugging "
                 f"Face cache {cache_dir} does not hold it: connect once, or set HF_HUB_OFFLINE=1 "
                 "and HF_HUB_CACHE to a cache that holds it") from missing
