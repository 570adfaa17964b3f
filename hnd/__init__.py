"""hnd: Head Network Distillation for split computing (Matsubara et al., IEEE Access 2020).

A teacher's first layers are replaced by a small student head with a narrow bottleneck;
the head runs on the edge device, the teacher's tail on the server.
"""

from hnd.analysis import Analysis, analyze, analyze_model
from hnd.checkpoints import load_model, read_checkpoint, save_checkpoint
from hnd.errors import HndError
from hnd.models import build_model, list_models
from hnd.students import Student, build_student
from hnd.teachers import TEACHERS, build_teacher, split_teacher

__version__ = "0.1.0"

__all__ = ["TEACHERS", "Analysis", "HndError", "Student", "__version__", "analyze", "analyze_model",
           "build_model", "build_student", "build_teacher", "list_models", "load_model", "read_checkpoint",
           "save_checkpoint", "split_teacher"]
