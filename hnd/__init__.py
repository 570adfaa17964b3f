"""hnd: Head Network Distillation for split computing (Matsubara et al., IEEE Access 2020).

A teacher's first layers are replaced by a small student head with a narrow bottleneck;
the head runs on the edge device, the teacher's tail on the server. Any torchvision image
classifier (or a registered module) can be the teacher; a model name is resolved once into
a :class:`ModelSpec` (:func:`resolve`); :func:`create_model` builds any model from a name, a
spec or a checkpoint.

The names below are imported when first used, so that the modules an edge device needs
(:mod:`hnd.tensor_codec`, :mod:`hnd.errors`) import without torch.
"""

import importlib

__version__ = "0.1.0"

_HOMES = {
    "Analysis": "hnd.analysis", "analyze": "hnd.analysis", "analyze_model": "hnd.analysis",
    "split_point_rows": "hnd.analysis",
    "read_checkpoint": "hnd.checkpoints", "save_checkpoint": "hnd.checkpoints",
    "HndError": "hnd.errors",
    "create_model": "hnd.models", "create_student": "hnd.models",
    "ModelSpec": "hnd.registry", "list_models": "hnd.registry", "resolve": "hnd.registry",
    "student_spec": "hnd.registry",
    "Student": "hnd.students",
    "TEACHERS": "hnd.teachers", "build_teacher": "hnd.teachers", "register_teacher": "hnd.teachers",
    "split_teacher": "hnd.teachers",
}

__all__ = sorted(_HOMES) + ["__version__"]


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'hnd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
