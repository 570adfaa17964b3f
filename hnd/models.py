"""The one way in: :func:`create_model` gives a teacher, a student or an autoencoder baseline from
a name, a spec or a checkpoint, for every command, notebook and the Python API (as timm's
``create_model`` and torchvision's ``get_model`` do).

The name is resolved once and the checkpoint read once. A checkpoint's own spec wins over the
name's defaults: a student trained at 80 px is rebuilt at 80 px with its head design, its class
count is read off its weights and an entropic student keeps its entropy tables. A name that
contradicts the checkpoint is a one-line error.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from hnd.checkpoints import Checkpoint, load_model, read_checkpoint
from hnd.errors import HndError
from hnd.registry import ModelSpec, resolve
from hnd.students import Student


def create_model(model: str | ModelSpec | None = None, *, checkpoint: str | os.PathLike | Checkpoint | None = None,
                 pretrained: bool = True, num_classes: int | None = None, input_size: int | None = None,
                 random_seed: int | None = None) -> nn.Module:
    """The model ``model`` (a name or spec), in eval mode, carrying its spec as ``.spec``.

    checkpoint: weights in any supported format (``model=None`` takes the model the file
      records); without one the model is built, its teacher weights pretrained or random.
    num_classes, input_size: for a built model (a checkpoint knows its own).
    random_seed: random weights that another process rebuilds identically (tests, demos).
    """
    spec = None if model is None else resolve(model)
    if checkpoint is not None:
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
        if input_size is not None or num_classes is not None:
            raise HndError(f"{ckpt.path} fixes its own input size and classes; build without --checkpoint to "
                           "choose them")
        return load_model(spec, ckpt)
    if spec is None:
        raise HndError("give a model name or a checkpoint that records its model")
    if random_seed is not None:
        torch.manual_seed(random_seed)
        pretrained = False
    return spec.at_input_size(input_size).build(pretrained=pretrained, num_classes=num_classes).eval()


def create_student(model: str | ModelSpec | None = None, *, checkpoint: str | os.PathLike | Checkpoint | None = None,
                   **options) -> Student:
    """:func:`create_model` for what splits between edge and server: a student. A teacher or an
    autoencoder baseline is a one-line error."""
    spec = None if model is None else resolve(model)
    if checkpoint is None and spec is not None and not spec.is_student:
        raise HndError(f"{spec} is a teacher: split computing here needs a student such as "
                       f"{spec.teacher.name}-3ch (see `hnd models`)")
    built = create_model(spec, checkpoint=checkpoint, **options)
    if not isinstance(built, Student):
        raise HndError(f"{getattr(built, 'spec', spec)} is not a student: only students split into an encoder "
                       "and a decoder")
    return built
