"""Small files, written atomically and read with one-line errors: run records, configs, device
profiles, certificates. No torch here, so that anything may import it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import yaml

from hnd.errors import HndError

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process's umask (there is no getter)


def atomic_write(path: str | os.PathLike, write, mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file in ``path``'s folder, then rename it to ``path``:
    the target is either the old file or the complete new one, never a partial write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; give it a normal file's mode
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically."""
    atomic_write(path, lambda f: f.write(text), mode="w")


def read_mapping(path: str | os.PathLike, what: str = "", valid: str = "a mapping") -> dict:
    """The mapping in a YAML (or ``.json``) file; an empty YAML file is ``{}``. ``what`` names
    the file in errors (e.g. "config file"), ``valid`` says what it must hold."""
    return _read(Path(path), what, "JSON" if Path(path).suffix == ".json" else "YAML", valid)


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in ``path`` (a run record, a grid file)."""
    return _read(Path(path), "", "JSON", "a JSON object")


def read_json_if_any(path: str | os.PathLike) -> dict | None:
    """:func:`read_json`, or None for a missing or unreadable file (a record not written yet,
    or cut short)."""
    try:
        return read_json(path) if Path(path).is_file() else None
    except HndError:
        return None


def _read(path: Path, what: str, kind: str, valid: str) -> dict:
    label = f"{what} {path}".strip()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise HndError(f"{label} not found") from None
    except OSError as exc:
        raise HndError(f"cannot read {label}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise HndError(f"{label} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HndError(f"{label} is not valid YAML: {first}") from None
    if doc is None and kind == "YAML":
        return {}
    if not isinstance(doc, dict):
        raise HndError(f"{label} must hold {valid}, got a {type(doc).__name__}")
    return doc
