"""Who may use a split server: client tokens, read from a file that can be rewritten while the
server runs (one token per line, so a new token can be added before an old one is removed)."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from hnd.errors import HndError
from hnd.protocol import MAX_TOKEN_BYTES


def read_token(path: str | os.PathLike) -> str:
    """The first token in ``path`` (what a client sends)."""
    tokens = _parse(Path(path))
    return tokens[0]


def _parse(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HndError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise HndError(f"token file {path} is not UTF-8 text") from None
    tokens = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise HndError(f"token file {path} holds no token (one per line; # starts a comment)")
    for n, token in enumerate(tokens, 1):
        if len(token.encode("utf-8")) > MAX_TOKEN_BYTES or len(token) < 16:
            raise HndError(f"token {n} in {path} must be 16 to {MAX_TOKEN_BYTES} bytes long, got "
                           f"{len(token.encode('utf-8'))}")
    return tokens


class TokenFile:
    """The tokens in ``path``, re-read whenever the file changes. :meth:`accepts` compares a
    presented token with every one of them in constant time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._tokens: list[bytes] = []
        self._load()

    def _load(self) -> None:
        try:
            stat = self.path.stat()
        except OSError as exc:
            if self._tokens:  # the file is being replaced: keep the tokens we have
                return
            raise HndError(f"cannot read token file {self.path}: {exc.strerror or exc}") from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._tokens = [t.encode("utf-8") for t in _parse(self.path)]
            self._stamp = stamp

    def accepts(self, token: str) -> bool:
        try:
            self._load()
        except HndError:  # a broken rewrite: keep serving the tokens read last
            pass
        presented = token.encode("utf-8")
        match = False
        for known in self._tokens:  # no early exit: the time does not tell which token matched
            match |= hmac.compare_digest(presented, known)
        return match
