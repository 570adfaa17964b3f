"""Teachers: torchvision classifiers, their pretrained weights, and their split.

A teacher is the unmodified torchvision model. Its forward pass is written here as
an ordered list of named *stages* (top-level modules that run one after another,
with torchvision's functional tail steps turned into modules), so that cutting
the list after a stage gives a head and a tail whose composition equals the
teacher's own forward exactly.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.error
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.inception import Inception3

from hnd.errors import HndError, describe_mismatch


@dataclass(frozen=True)
class TeacherSpec:
    """Facts about one teacher: builder, the paper's weights, input and split point."""

    name: str
    family: str  # "densenet" | "resnet" | "inception"
    builder: object  # torchvision builder, e.g. torchvision.models.densenet169
    weights: tvm.WeightsEnum  # the weights the papers used (IMAGENET1K_V1)
    input_size: int  # side of the square network input
    resize_size: int  # evaluation: shorter side resized to this, then centre crop
    split_point: str  # last teacher stage of the official head (original-hnd.md §2)


TEACHERS: dict[str, TeacherSpec] = {
    spec.name: spec
    for spec in [
        TeacherSpec("densenet121", "densenet", tvm.densenet121, tvm.DenseNet121_Weights.IMAGENET1K_V1,
                    224, 256, "transition2"),
        TeacherSpec("densenet169", "densenet", tvm.densenet169, tvm.DenseNet169_Weights.IMAGENET1K_V1,
                    224, 256, "transition2"),
        TeacherSpec("densenet201", "densenet", tvm.densenet201, tvm.DenseNet201_Weights.IMAGENET1K_V1,
                    224, 256, "transition2"),
        TeacherSpec("resnet50", "resnet", tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1,
                    224, 256, "layer2"),
        TeacherSpec("resnet101", "resnet", tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1,
                    224, 256, "layer2"),
        # IMAGENET1K_V1 (78.31% top-1), not torchvision's default V2: the published tails and
        # HND heads were trained against V1.
        TeacherSpec("resnet152", "resnet", tvm.resnet152, tvm.ResNet152_Weights.IMAGENET1K_V1,
                    224, 256, "layer2"),
        # The original evaluates Inception-v3 at shorter side 327, crop 299 (torchvision uses 342).
        TeacherSpec("inception_v3", "inception", tvm.inception_v3, tvm.Inception_V3_Weights.IMAGENET1K_V1,
                    299, 327, "maxpool2"),
    ]
}

PAPER_TEACHERS = ("densenet169", "densenet201", "resnet152", "inception_v3")

_DOWNLOAD_TIMEOUT_S = 60


def teacher_spec(name: str) -> TeacherSpec:
    """The spec of teacher ``name``; unknown names raise an error listing the valid ones."""
    try:
        return TEACHERS[name]
    except KeyError:
        raise HndError(f"unknown teacher {name!r}; valid teachers: {', '.join(TEACHERS)}") from None


def weights_path(name: str) -> Path:
    """Where torchvision's weights API caches teacher ``name``'s pretrained file."""
    url = teacher_spec(name).weights.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _fetch_weights(name: str) -> Path:
    """Return the cached weights file, downloading it (hash-checked) when it is missing,
    unless the environment sets ``HND_OFFLINE=1``."""
    path = weights_path(name)
    if path.is_file():
        return path
    url = teacher_spec(name).weights.url
    if os.environ.get("HND_OFFLINE") == "1":
        raise HndError(f"pretrained weights for {name} are missing and HND_OFFLINE=1 forbids downloading; "
                       f"put torchvision's file {path.name} at {path} (from {url}) or set TORCH_HOME")
    hash_prefix = re.search(r"-([a-f0-9]+)\.pth$", url).group(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        # Writes to a temporary file and renames it only after the SHA-256 prefix matched.
        torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix, progress=False)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        raise HndError(
            f"pretrained weights for {name} are missing and could not be downloaded ({exc}); "
            f"put torchvision's file {path.name} at {path} (from {url}) or set TORCH_HOME"
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return path


# torchvision's DenseNet files still use the old 'norm.1'-style layer keys.
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$")


def load_teacher_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Teacher ``name``'s pretrained state_dict, read safely (``weights_only=True``) on CPU."""
    path = _fetch_weights(name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or code-running file
        raise HndError(f"cannot read pretrained weights {path}: {str(exc).splitlines()[0]}; "
                       f"delete the file and fetch {teacher_spec(name).weights.url} again") from None
    if not isinstance(state, dict):
        raise HndError(f"pretrained weights {path} hold a {type(state).__name__}, not a state_dict")
    if teacher_spec(name).family == "densenet":
        state = {(_OLD_DENSENET_KEY.sub(r"\1\2", k)): v for k, v in state.items()}
    return state


def build_teacher(name: str, *, pretrained: bool = True, num_classes: int = 1000,
                  transform_input: bool | None = None) -> nn.Module:
    """Build teacher ``name`` with torchvision's builder, in eval mode.

    pretrained: load the paper's ImageNet weights (IMAGENET1K_V1) from torchvision's cache.
    transform_input: Inception-v3 only. ``None`` follows torchvision (on with pretrained
    weights, which expect it; off otherwise).
    Inception-v3 is always built without its auxiliary classifier.
    """
    spec = teacher_spec(name)
    kwargs: dict = {"weights": None}
    if pretrained and num_classes != 1000:
        raise HndError(f"pretrained {name} has 1000 classes, got num_classes={num_classes}")
    kwargs["num_classes"] = num_classes
    if spec.family == "inception":
        kwargs["transform_input"] = pretrained if transform_input is None else transform_input
        # Pretrained files carry the auxiliary classifier's weights: build it, load, then drop it.
        kwargs["aux_logits"] = pretrained
        kwargs["init_weights"] = not pretrained
    elif transform_input:
        raise HndError(f"transform_input applies to inception_v3 only, not {name}")
    model = spec.builder(**kwargs)
    if pretrained:
        state = load_teacher_state_dict(name)
        try:
            model.load_state_dict(state)
        except RuntimeError:
            # Old files lack BatchNorm's num_batches_tracked, which loading fills in.
            expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
            raise HndError(f"pretrained weights {weights_path(name)} do not fit {name}: "
                           f"{describe_mismatch(expected, state)}") from None
    if spec.family == "inception":
        model.aux_logits = False
        model.AuxLogits = None
    return model.eval()


def replace_classifier(name: str, teacher: nn.Module, num_classes: int) -> nn.Module:
    """Give ``teacher`` a freshly initialised classifier for ``num_classes`` classes (fine-tuning
    on another dataset); returns the teacher."""
    attr = "classifier" if teacher_spec(name).family == "densenet" else "fc"
    old = getattr(teacher, attr)
    setattr(teacher, attr, nn.Linear(old.in_features, num_classes))
    return teacher


def classifier_classes(state: dict[str, torch.Tensor]) -> int | None:
    """Number of classes of a teacher or student state_dict, read off its final linear layer."""
    for key in ("classifier.weight", "fc.weight", "tail.classifier.weight", "tail.fc.weight"):
        if key in state and state[key].ndim == 2:
            return state[key].shape[0]
    return None


class InceptionInputTransform(nn.Module):
    """Inception-v3's ``transform_input`` step (ImageNet-normalized → the [-1, 1] range of the
    ported weights), as a module so that it can start a teacher head."""

    transform_input = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Inception3._transform_input(self, x)  # torchvision's own arithmetic, bit-exact


def _stage_names(family: str) -> list[str]:
    if family == "resnet":
        return ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    if family == "inception":
        return ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool", "dropout"]
    raise AssertionError(family)


def teacher_stages(name: str, teacher: nn.Module) -> list[tuple[str, nn.Module]]:
    """The teacher's eval-mode forward as named stages; running them in order equals ``teacher(x)``.

    The stages share the teacher's modules (no copies). Functional steps of torchvision's
    forward become parameter-free modules: DenseNet's final ReLU/pool, the flatten before the
    classifier, and Inception-v3's ``transform_input`` when the teacher has it on.
    """
    family = teacher_spec(name).family
    if family == "densenet":
        stages = list(teacher.features.named_children())
        stages += [("relu", nn.ReLU(inplace=True)), ("pool", nn.AdaptiveAvgPool2d(1)),
                   ("flatten", nn.Flatten(1)), ("classifier", teacher.classifier)]
        return stages
    stages = [(n, getattr(teacher, n)) for n in _stage_names(family)]
    if family == "inception" and teacher.transform_input:
        stages.insert(0, ("transform_input", InceptionInputTransform()))
    return stages + [("flatten", nn.Flatten(1)), ("fc", teacher.fc)]


def split_teacher(name: str, teacher: nn.Module, split_point: str | None = None, *,
                  transform_input: bool | None = None) -> tuple[nn.Sequential, nn.Sequential]:
    """Cut the teacher after stage ``split_point`` (default: the official one) into (head, tail).

    ``tail(head(x)) == teacher(x)`` exactly in eval mode. transform_input (Inception-v3):
    ``None`` keeps the teacher's setting in the head; ``False`` drops it, which is what the
    original HND code did for its targets (its teacher never applied it).
    """
    stages = teacher_stages(name, teacher)
    if transform_input is False:
        stages = [(n, m) for n, m in stages if n != "transform_input"]
    elif transform_input and stages[0][0] != "transform_input":
        stages.insert(0, ("transform_input", InceptionInputTransform()))
    split_point = split_point or teacher_spec(name).split_point
    names = [n for n, _ in stages]
    if split_point not in names[:-1]:
        raise HndError(f"unknown split point {split_point!r} for {name}; valid: {', '.join(names[:-1])}")
    cut = names.index(split_point) + 1
    return nn.Sequential(OrderedDict(stages[:cut])), nn.Sequential(OrderedDict(stages[cut:]))
