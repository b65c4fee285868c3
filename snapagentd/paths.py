"""Directories the daemon may keep its socket and journal in.

Whoever can write to such a directory can swap our file for theirs or plant a symlink after
we looked, so a directory is trusted only if it is not a symlink, belongs to root or to the
daemon's user, and is not writable by everyone (unless sticky, like /tmp).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UntrustedDirectory(Exception):
    """The directory could be controlled by another user; the message says how."""


def check_trusted_directory(directory: Path) -> None:
    info = directory.lstat()
    if stat.S_ISLNK(info.st_mode):
        raise UntrustedDirectory(f"{directory} is a symlink")
    if info.st_uid not in (0, os.geteuid()):
        raise UntrustedDirectory(f"{directory} belongs to uid {info.st_uid}, not to us or root")
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise UntrustedDirectory(f"{directory} is writable by everyone")
