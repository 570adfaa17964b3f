"""hnd.files: atomic writes that leave the old file or the whole new one, and readers whose
errors are one line naming the file."""

from __future__ import annotations

import os
import stat

import pytest

from conftest import error
from hnd.files import atomic_write, read_json, read_json_if_any, read_mapping, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    write_text(path, '{"a": 1}\n')

    def half_then_fail(f):
        f.write(b'{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_new_files_get_the_umask_mode_not_a_private_one(tmp_path):
    path = tmp_path / "sub" / "config.yaml"  # the folder is made
    write_text(path, "lr: 0.1\n")
    expected = 0o666 & ~_umask()
    assert stat.S_IMODE(os.stat(path).st_mode) == expected
    assert read_mapping(path) == {"lr": 0.1}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("name, text, what, expected", [
    ("c.yaml", "lr: [unclosed\n", "config file", "config file {path} is not valid YAML: "),
    ("c.yaml", "- 1\n- 2\n", "config file", "config file {path} must hold a mapping, got a list"),
    ("c.json", '{"a": ', "device profile", "device profile {path} is not valid JSON (Expecting value at line 1)"),
    ("gone.yaml", None, "config file", "config file {path} not found"),
])
def test_readers_say_what_is_wrong_in_one_line(tmp_path, name, text, what, expected):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    message = error(read_mapping, path, what)
    assert message.startswith(expected.format(path=path)) and "\n" not in message


def test_read_json_if_any_is_none_for_missing_or_cut_short_records(tmp_path):
    assert read_json_if_any(tmp_path / "none.json") is None
    (tmp_path / "cut.json").write_text('{"status": "runn')
    assert read_json_if_any(tmp_path / "cut.json") is None
    (tmp_path / "empty.yaml").write_text("")
    assert read_mapping(tmp_path / "empty.yaml") == {}
