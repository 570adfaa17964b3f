"""What one teacher name means: :class:`TeacherSpec`, the facts resolved once from it.

Its own module so that the teachers of each source (torchvision and a user's modules in
:mod:`hnd.teachers`, timm's in :mod:`hnd.timm_teachers`) share one record without importing
each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from hnd.preprocessing import IMAGENET_MEAN, IMAGENET_STD

SOURCES = ("torchvision", "timm", "user")


@dataclass(frozen=True)
class TeacherSpec:
    """Facts about one teacher, resolved once from its name."""

    name: str
    family: str  # the builder's module: densenet, resnet, inception, mobilenetv3, ...; timm's as timm.resnet
    builder: object  # callable(weights=None, **kwargs) -> nn.Module (compared by identity)
    weights: object | None  # torchvision's WeightsEnum member (None: timm's config, or a user's module's own)
    input_size: int  # side of the square network input
    resize_size: int  # evaluation: shorter side resized to this, then centre crop
    interpolation: str = "bilinear"  # evaluation resize
    split_point: str | None = None  # staged teachers: the official split (tests/reference/original-hnd-facts.md §1)
    staged: bool = False  # one of the seven hand-written stage lists
    source: str = "torchvision"  # one of SOURCES
    num_classes: int = 1000  # classes of the pretrained weights (a user module's own)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalization the weights were trained with
    std: tuple[float, float, float] = IMAGENET_STD
    fixed_input_size: bool = False  # timm: built for one input side (position embeddings)
    labels: object | None = None  # timm: callable() -> the class names (compared by identity)

    @property
    def user(self) -> bool:
        """Registered with :func:`hnd.teachers.register_teacher`, not a library's builder."""
        return self.source == "user"

    @property
    def top1(self) -> float | None:
        """ImageNet top-1 of the pretrained weights, as torchvision quotes it."""
        try:
            return float(self.weights.meta["_metrics"]["ImageNet-1K"]["acc@1"])
        except (AttributeError, KeyError, TypeError):
            return None

    @property
    def categories(self) -> list[str] | None:
        """The pretrained classifier's class names, where its library ships them."""
        if self.labels is not None:
            return self.labels()
        return self.weights.meta.get("categories") if self.weights is not None else None
