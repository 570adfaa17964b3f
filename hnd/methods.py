"""What each training method trains, against which frozen reference, with which loss.

- ``naive``: the whole student (head + tail), cross-entropy on the labels;
- ``kd``: the whole student, ``alpha·CE + (1-alpha)·T²·KL`` against the frozen teacher's logits;
- ``hnd``: only the student head, summed squared error to the frozen teacher head's output
  (the teacher head stays in eval mode, so its BatchNorm statistics never move);
- ``ae``: an autoencoder inserted at the teacher's split point, summed squared error to the
  frozen teacher head's output (the baseline of the papers);
- ``head_kd`` (not in the papers; the book's ablation of HND's loss): HND's student head and
  frozen teacher tail, the head trained on KD's loss at the tail's output instead of the
  squared error to the teacher head's output;
- ``teacher``: a teacher trained (or fine-tuned) with cross-entropy, e.g. on a dataset
  without pretrained weights;
- ``entropic``: the Entropic Student (Matsubara et al., WACV 2022), in two stages. Stage 1
  trains the student head's encoder, entropy model and decoder against the frozen teacher head
  with ``summed squared error + beta · bits`` (the rate of the noisy bottleneck under the
  learned prior); stage 2 freezes encoder and entropy model (the bottleneck is then rounded)
  and fine-tunes decoder + the student's own copy of the tail with KD against the teacher.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hnd.autoencoder import build_ae_model
from hnd.models import create_model
from hnd.config import TrainConfig
from hnd.errors import HndError
from hnd.losses import head_mse_loss, kd_loss
from hnd.registry import student_from_teacher
from hnd.students import BottleneckHead
from hnd.teacher_outputs import TeacherOutputs
from hnd.teachers import build_teacher, classifier_classes, replace_classifier, split_teacher

FROZEN_TAIL_METHODS = ("hnd", "head_kd")  # students whose tail is the teacher's, unchanged: their head must mimic


def build_reference_teacher(config: TrainConfig, num_classes: int) -> nn.Module:
    """The teacher a run starts from, in eval mode: a teacher checkpoint trained with this
    library, the teacher's pretrained weights (classifier replaced if the dataset has another
    class count and the method may train it), or random weights (``pretrained=false``)."""
    spec = config.spec.as_teacher()
    teacher_input = spec.teacher.family in ("inception", "googlenet")
    transform_input = config.inception_transform_input if spec.teacher.name == "inception_v3" else None
    if config.teacher_checkpoint:
        teacher = create_model(spec, checkpoint=config.teacher_checkpoint)
        found = classifier_classes(teacher.state_dict())
        if found != num_classes:
            raise HndError(f"teacher checkpoint {config.teacher_checkpoint} has {found} classes but the data has "
                           f"{num_classes}")
        if teacher_input and transform_input is not None:
            teacher.transform_input = transform_input
        return teacher.eval()
    if not config.pretrained:
        return build_teacher(spec.teacher, pretrained=False, num_classes=num_classes, transform_input=transform_input,
                             input_size=spec.input_size)
    teacher = build_teacher(spec.teacher, pretrained=True, transform_input=transform_input,
                            input_size=spec.input_size)
    if num_classes != spec.teacher.num_classes:
        if config.method not in ("naive", "teacher"):
            raise HndError(f"method {config.method} needs a teacher trained for the data's {num_classes} classes; "
                           f"train one with `hnd train {spec} --method teacher` and pass "
                           "teacher_checkpoint=RUN/best.pt")
        replace_classifier(teacher, num_classes)
    return teacher.eval()


@dataclass
class Task:
    """The modules of one method. ``model`` is evaluated end to end and saved; ``trained`` is
    the part whose parameters are optimised (its forward is the one wrapped by DDP);
    ``reference`` is frozen and gives the targets."""

    method: str
    model: nn.Module
    trained: nn.Module
    reference: nn.Module | None
    part: str  # checkpoint part: student | teacher | ae
    kd_temperature: float = 1.0
    kd_alpha: float = 0.5
    beta: float = 0.0  # entropic: weight of the rate in bits
    stage: int = 1  # entropic: 1 (head, distortion + rate) or 2 (decoder + tail, KD)
    teacher: nn.Module | None = None  # the whole frozen teacher (KD, HND, AE, entropic: stage 2's reference;
    # naive: an untouched copy, only to fill a teacher_cache)
    frozen: tuple[nn.Module, ...] = ()  # parts of ``trained`` that stay in eval mode
    bits: float = 0.0  # entropic stage 1: rate summed over this epoch's images (one process)
    cache: TeacherOutputs | None = None  # the reference's outputs per training key (teacher_cache)

    @property
    def target_kind(self) -> str:
        """What the frozen reference gives: the teacher's ``logits`` (KD, head_kd, entropic stage 2) or
        the teacher head's output (``head``: HND, AE, entropic stage 1)."""
        return "logits" if self.method in ("kd", "head_kd") or (self.method == "entropic" and self.stage == 2) \
            else "head"

    @property
    def gives_logits(self) -> bool:
        """Whether a training step computes the student's logits (then train top-1 is logged)."""
        return self.method in ("naive", "teacher") or self.target_kind == "logits"

    def target(self, x: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
        """The frozen reference's output for batch ``x``: read from the cache by ``keys`` when
        there is one, else computed."""
        if self.cache is not None and keys is not None:
            return self.cache.targets(self.target_kind, keys, x.device)
        with torch.no_grad():
            return self.reference(x)

    @property
    def summed_loss(self) -> bool:
        """HND, AE and entropic stage-1 losses are sums over the batch, not means."""
        return self.method in ("hnd", "ae") or (self.method == "entropic" and self.stage == 1)

    def train_mode(self) -> None:
        """Everything in eval mode except the trained part (frozen BN statistics stay put)."""
        self.model.eval()
        if self.reference is not None:
            self.reference.eval()
        self.trained.train()
        for module in self.frozen:
            module.eval()
        self.bits = 0.0

    def enter_stage(self, stage: int) -> None:
        """Entropic stage 2: freeze the encoder and the entropy model (its coding tables are
        final), then train the decoder and the tail with KD against the teacher."""
        if self.method != "entropic" or stage == self.stage:
            return
        if stage != 2:
            raise HndError(f"an entropic run cannot go back from stage {self.stage} to {stage}")
        head = self.model.head
        head.prior.update_tables()
        for part in (head.encoder, head.prior):
            _freeze(part)
        for p in list(head.decoder.parameters()) + list(self.model.tail.parameters()):
            p.requires_grad_(True)
        self.stage, self.trained, self.reference = 2, self.model, self.teacher
        self.frozen = (head.encoder, head.prior)

    def end_epoch(self) -> None:
        """Entropic stage 1: refresh the coding tables from the prior as it now is, so that
        evaluation and checkpoints round and code exactly as a deployed student would."""
        if self.method == "entropic" and self.stage == 1:
            self.model.head.prior.update_tables()

    def loss(self, forward: nn.Module, x: torch.Tensor, y: torch.Tensor,
             keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, logits or None) of one batch; ``forward`` is ``trained``, possibly DDP-wrapped;
        ``keys``: the batch's rows in the teacher-output cache, if any."""
        if self.method in ("naive", "teacher"):
            logits = forward(x)
            return F.cross_entropy(logits, y), logits
        target = self.target(x, keys)  # KD: teacher logits; HND/AE: teacher head output
        if self.method in ("kd", "head_kd"):
            logits = forward(x) if self.method == "kd" else self.model.tail(forward(x))  # head_kd: frozen tail
            return kd_loss(logits, target, y, temperature=self.kd_temperature, alpha=self.kd_alpha), logits
        if self.method == "hnd":
            return head_mse_loss(forward(x), target), None
        if self.method == "entropic":
            if self.stage == 2:
                logits = forward(x)
                return kd_loss(logits, target, y, temperature=self.kd_temperature, alpha=self.kd_alpha), logits
            out, bits = forward(x)  # head output, bits per image [N]
            self.bits += float(bits.detach().sum())
            return head_mse_loss(out, target) + self.beta * bits.sum(), None
        return head_mse_loss(forward(target), target), None  # ae reconstructs the head output


@torch.no_grad()
def check_input_size(task: Task, size: int) -> None:
    """Run one blank image through the model (eval mode) so that an input too small for its
    layers fails here, with a clear message, rather than in the first training step."""
    x = torch.zeros(1, 3, size, size)
    try:
        task.model.eval()(x)
    except RuntimeError as exc:
        raise HndError(f"input_size={size} does not fit this model ({str(exc).splitlines()[0]}); "
                       "use the official input size or a larger one") from None
    if task.method == "hnd":  # the student head must reproduce the teacher head's shape
        student, teacher = tuple(task.trained(x).shape[1:]), tuple(task.reference.eval()(x).shape[1:])
        if student != teacher:
            raise HndError(f"at input_size={size} the student head outputs {student} but the teacher head "
                           f"{teacher}; choose another input_size (the official one always fits)")


class _RateHead(nn.Module):
    """An entropic head whose forward gives (head output, bits per image), so that DDP wraps
    the call that training makes."""

    def __init__(self, head: BottleneckHead):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head.forward_with_rate(x)


def stage_of(config: TrainConfig, epoch: int) -> int:
    """The stage of 0-based ``epoch``: entropic runs switch to 2 after ``stage1_epochs``."""
    return 2 if config.method == "entropic" and epoch >= config.stage1_epochs else 1


def _fused(params: list[nn.Parameter]) -> bool:
    """Whether torch's fused optimizer step (one kernel over all tensors) serves ``params``: on
    CPU and CUDA. On the CPU it took a ShuffleNet student's Adam step from 6.9 to 2.8 ms."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def make_optimizer(config: TrainConfig, module: nn.Module, stage: int = 1):
    """(optimizer, per-epoch MultiStepLR) over ``module``'s trainable parameters, fused where they
    are on CPU or CUDA (so build it after placing them); entropic stage 2 uses SGD with
    ``stage2_lr`` and ``stage2_milestones``."""
    params = [p for p in module.parameters() if p.requires_grad]
    fused = _fused(params)
    if stage == 2:
        optimizer = torch.optim.SGD(params, lr=config.stage2_lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay, fused=fused)
        milestones = config.stage2_milestones
    elif config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                                    fused=fused)
        milestones = config.milestones
    else:
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
        milestones = config.milestones
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, config.gamma)


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def build_task(config: TrainConfig, num_classes: int) -> Task:
    """Build the modules of ``config.method`` (fresh student head / autoencoder from the
    current RNG state: seed before calling)."""
    teacher = build_reference_teacher(config, num_classes)
    spec = config.spec
    kd = {"kd_temperature": config.kd_temperature, "kd_alpha": config.kd_alpha}
    if config.method == "teacher":
        return Task("teacher", teacher, teacher, None, "teacher", **kd)
    if config.method == "naive":
        # the tail is trained in place; a pristine copy of the teacher fills a teacher_cache
        pristine = copy.deepcopy(teacher) if config.teacher_cache else None
        student = student_from_teacher(spec, teacher)
        return Task("naive", student, student, None, "student", teacher=pristine, **kd)
    if config.method == "kd":
        student = student_from_teacher(spec, copy.deepcopy(teacher))  # own, trainable tail
        return Task("kd", student, student, _freeze(teacher), "student", teacher=teacher, **kd)
    _freeze(teacher)
    if config.method == "entropic":
        teacher_head, _ = split_teacher(spec.teacher, teacher, spec.split_point,
                                        transform_input=spec.head_transform_input)
        student = student_from_teacher(spec, copy.deepcopy(teacher))  # own tail, frozen until stage 2
        _freeze(student.tail)
        return Task("entropic", student, _RateHead(student.head), teacher_head, "student", beta=config.beta,
                    teacher=teacher, frozen=(student.tail,), **kd)
    if config.method == "hnd":
        teacher_head, _ = split_teacher(spec.teacher, teacher, spec.split_point,
                                        transform_input=spec.head_transform_input)
        student = student_from_teacher(spec, teacher)  # shares the frozen tail
        return Task("hnd", student, student.head, teacher_head, "student", teacher=teacher, **kd)
    if config.method == "head_kd":
        student = student_from_teacher(spec, teacher)  # shares the frozen tail, as HND
        return Task("head_kd", student, student.head, teacher, "student", teacher=teacher, **kd)
    model = build_ae_model(spec, teacher, config.ae_channels)  # only model.ae is trainable
    return Task("ae", model, model.ae, model.head, "ae", teacher=teacher, **kd)
