"""The one exception type for user mistakes (bad names, files, values).

The CLI prints its message on one line and exits with status 2; library callers
can catch it to tell a user error from a bug.
"""


class HndError(Exception):
    """A user-facing error whose message says what is wrong and what is valid."""


def describe_mismatch(expected: dict, found: dict, limit: int = 3) -> str:
    """The first ``limit`` differences between two state_dicts (missing keys, shape
    mismatches, unexpected keys), for one-line error messages; '' if they fit."""
    diffs = []
    for key, value in expected.items():
        if key not in found:
            diffs.append(f"{key} missing")
        elif tuple(found[key].shape) != tuple(value.shape):
            diffs.append(f"{key} {list(found[key].shape)} vs model {list(value.shape)}")
    diffs += [f"{key} unexpected" for key in found if key not in expected]
    return "; ".join(diffs[:limit]) + (f" (and {len(diffs) - limit} more)" if len(diffs) > limit else "")
