"""The classifier head: the one part of a checkpoint that may deliberately not fit the model.

Every format (PyTorch state dicts in `mapping`, parameter directories and fine-tune checkpoints
in `export`) decides with `check_head` whether the checkpoint's head is loaded, so `drop_head`
means the same everywhere and a mismatch is one `HeadMismatchError` that says how many classes
each side has; callers that know the config name the key that fixes it.
"""

from __future__ import annotations

from absl import logging


class HeadMismatchError(ValueError):
  """The checkpoint's classifier head does not fit the model's and drop_head is off."""

  def __init__(self, message: str, checkpoint_classes: int, model_classes: int):
    super().__init__(message)
    self.checkpoint_classes, self.model_classes = checkpoint_classes, model_classes


def check_head(checkpoint_classes: int, model_classes: int, drop_head: bool) -> bool:
  """Whether to load the checkpoint's head (0 classes: no head on that side).

  drop_head keeps the model's own (freshly initialised) head and ignores any head in the
  checkpoint; without it both must have the same number of classes."""
  if drop_head:
    if checkpoint_classes:
      logging.info("drop_head: ignoring the checkpoint's %d-class head; the model keeps its own "
                   "initialisation.", checkpoint_classes)
    return False
  if checkpoint_classes == model_classes:
    return bool(model_classes)
  if not checkpoint_classes:
    message = (
        f"the checkpoint has no classifier head (e.g. a SimMIM, pretrain encoder or "
        f"num_classes=0 checkpoint) but the model has one with {model_classes} classes: pass "
        "drop_head=True to keep the model's freshly initialised head (CLI: --drop_head), or "
        "build the model with num_classes=0")
  elif not model_classes:
    message = (
        f"the checkpoint has a classifier head ({checkpoint_classes} classes) but the model has "
        "none (num_classes=0): pass drop_head=True to discard it, or build the model with "
        f"num_classes={checkpoint_classes}")
  else:
    message = (
        f"the checkpoint's head has {checkpoint_classes} classes but the model has "
        f"num_classes={model_classes}: pass drop_head=True to keep the model's freshly "
        f"initialised head (CLI: --drop_head), or build the model with "
        f"num_classes={checkpoint_classes}")
  raise HeadMismatchError(message, checkpoint_classes, model_classes)
