"""Builds state_dicts in the original code's key layout (tests/reference/original-hnd-facts.md §1-2), from
our modules, walking them in the order the original's decomposition flattened them."""

from __future__ import annotations

from torch import nn

from hnd.students import Student


def _module_state(prefix: str, module: nn.Module) -> dict:
    return {f"{prefix}.{k}": v.clone() for k, v in module.state_dict().items()}


def original_head_state(student: Student) -> dict:
    """Keys ``extractor.0-3`` (stem) and ``module_seq.N`` (BN, ReLU, bottleneck conv, decoder)."""
    modules = list(student.head.encoder) + list(student.head.decoder)
    state = {}
    for i, m in enumerate(modules):
        state.update(_module_state(f"extractor.{i}" if i < 4 else f"module_seq.{i - 4}", m))
    return state


def _flat_tail(student: Student) -> tuple[list[nn.Module], nn.Module]:
    t = dict(student.tail.named_children())
    if "denseblock3" in t:
        flat = [*t["denseblock3"].children(), *t["transition3"].children(), *t["denseblock4"].children(),
                t["norm5"], nn.ReLU(), nn.AvgPool2d(7)]
        return flat, t["classifier"]
    if "layer3" in t:
        return [*t["layer3"], *t["layer4"], t["avgpool"]], t["fc"]
    mixed = [m for n, m in t.items() if n.startswith("Mixed_")]
    return [*mixed, t["avgpool"], t["dropout"]], t["fc"]


def original_model_state(student: Student) -> dict:
    """Whole "mimic" model: ``student_model.*``, ``features.N.*``, ``classifier.*``."""
    state = {f"student_model.{k}": v for k, v in original_head_state(student).items()}
    flat, classifier = _flat_tail(student)
    for i, m in enumerate(flat):
        state.update(_module_state(f"features.{i}", m))
    state.update(_module_state("classifier", classifier))
    return state


def naive_checkpoint(student: Student) -> dict:
    return {"type": f"{student.spec.teacher.name}_mimic", "model": original_model_state(student),
            "acc": 71.3, "epoch": 20}


def kd_checkpoint(student: Student) -> dict:
    import argparse

    model = original_model_state(student)
    return {"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
            "lr_scheduler": {"milestones": {5: 1, 10: 1, 15: 1}, "gamma": 0.1}, "best_value": 70.2,
            "config": {"train": {"epoch": 20}},
            "args": argparse.Namespace(config="kd.yaml", device="cuda", test_only=False)}


def hnd_checkpoint(student: Student) -> dict:
    return {"type": student.spec.teacher.name, "model": original_head_state(student), "epoch": 21,
            "best_valid_value": 69.9, "student": True}
