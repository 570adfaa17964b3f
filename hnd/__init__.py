"""hnd: Head Network Distillation for split computing (Matsubara et al., IEEE Access 2020).

A teacher's first layers are replaced by a small student head with a narrow bottleneck;
the head runs on the edge device, the teacher's tail on the server. Any torchvision image
classifier (or a registered module) can be the teacher; a model name is resolved once into
a :class:`ModelSpec` (:func:`resolve`); :func:`create_model` builds any model from a name, a
spec or a checkpoint.
"""

from hnd.analysis import Analysis, analyze, analyze_model, split_point_rows
from hnd.checkpoints import read_checkpoint, save_checkpoint
from hnd.errors import HndError
from hnd.models import create_model, create_student
from hnd.registry import ModelSpec, list_models, resolve, student_spec
from hnd.students import Student
from hnd.teachers import TEACHERS, build_teacher, register_teacher, split_teacher

__version__ = "0.1.0"

__all__ = ["TEACHERS", "Analysis", "HndError", "ModelSpec", "Student", "__version__", "analyze", "analyze_model",
           "build_teacher", "create_model", "create_student", "list_models",
           "read_checkpoint", "register_teacher", "resolve", "save_checkpoint", "split_point_rows", "split_teacher",
           "student_spec"]
