"""Files written whole or not at all: the new content goes to a temporary file beside the old one and is renamed over
it, so a kill, a Ctrl-C or a full disk mid-write leaves the previous file as it was. ``evaluate``'s ``routing.pt``
and result JSON, ``collect``'s ``results.md`` and ``results.png`` were written in place: a kill left a half-written
``routing.pt`` (which ``torch.load`` refused) or an empty ``results.png`` where the previous one had been."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


@contextmanager
def replaced_whole(path: Union[str, Path]) -> Iterator[Path]:
    """The temporary path to write ``path``'s new content to: renamed over ``path`` when the block ends, removed
    when it raises. Hidden, named by host and process (jobs on several nodes may write one shared file), and with
    ``path``'s suffix, which writers such as matplotlib's ``savefig`` read the format from."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{socket.gethostname()}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
