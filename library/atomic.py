"""Atomic replacement of finished folders: a reader sees the old folder or the new one, never a mix."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_folder(source: Path, target: Path) -> None:
    """Move the finished folder ``source`` to ``target`` with renames only, replacing any ``target``.

    The old folder is renamed aside first and deleted only after the new one is in place, so an
    interruption leaves either the old or the new folder under ``target`` (plus, at worst, a hidden
    ``.NAME.old-PID`` leftover), never a half-written one.
    """
    source, target = Path(source), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)
