"""What an edge device needs beside an exported encoder, in a small JSON file next to it
(``encoder.onnx`` -> ``encoder.json``, written by ``hnd export``): the model's name and spec,
its evaluation preprocessing, the bottleneck's shape, the wire formats it may be sent in and,
for an entropic student, its coding tables with their fingerprint. Read without torch.

The file names the ONNX file's SHA-256, so a sidecar that does not belong to the encoder beside
it is a one-line error rather than wrong answers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from hnd.errors import HndError
from hnd.preprocessing import Preprocessing
from hnd.range_coder import ENTROPY_FORMAT, CodingTables
from hnd.tensor_codec import TENSOR_FORMATS

FORMAT, VERSION = "hnd-encoder", 1


def sidecar_path(onnx: str | os.PathLike) -> Path:
    return Path(onnx).with_suffix(".json")


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True, eq=False)
class EncoderBundle:
    """An exported encoder and everything the device must know to use it."""

    onnx: Path
    model: str  # the student's canonical name
    spec: dict  # ModelSpec.to_dict(): the server rebuilds the same model from it
    preprocessing: Preprocessing
    bottleneck_shape: tuple[int, int, int]
    tables: CodingTables | None = None  # entropic students

    @property
    def wire_formats(self) -> tuple[str, ...]:
        return (*TENSOR_FORMATS, ENTROPY_FORMAT) if self.tables is not None else TENSOR_FORMATS

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "onnx": self.onnx.name, "onnx_sha256": file_sha256(self.onnx),
                "model": self.model, "spec": self.spec, "preprocessing": self.preprocessing.to_dict(),
                "bottleneck_shape": list(self.bottleneck_shape), "wire_formats": list(self.wire_formats),
                "entropy": self.tables.to_dict() if self.tables is not None else None}

    @classmethod
    def read(cls, onnx: str | os.PathLike) -> EncoderBundle:
        """The bundle of the encoder at ``onnx`` (its sidecar beside it); a missing, damaged or
        mismatched sidecar is a one-line error."""
        onnx, side = Path(onnx), sidecar_path(onnx)
        if not onnx.is_file():
            raise HndError(f"encoder not found: {onnx}; write it with hnd export NAME --part encoder --out {onnx}")
        try:
            doc = json.loads(side.read_text())
        except OSError:
            raise HndError(f"{side} is missing: hnd export writes it beside {onnx.name}; copy both") from None
        except ValueError as exc:
            raise HndError(f"{side} is not JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise HndError(f"{side} is not an hnd encoder sidecar of version {VERSION}")
        if doc.get("onnx_sha256") != file_sha256(onnx):
            raise HndError(f"{side} describes another encoder than {onnx} (SHA-256 differs); export both again")
        try:
            shape = tuple(int(v) for v in doc["bottleneck_shape"])
            tables = CodingTables.from_dict(doc["entropy"]) if doc.get("entropy") else None
            return cls(onnx, str(doc["model"]), dict(doc["spec"]), Preprocessing.from_dict(doc["preprocessing"]),
                       shape, tables)
        except (KeyError, TypeError, ValueError):
            raise HndError(f"{side} is damaged: it needs model, spec, preprocessing and bottleneck_shape") from None
