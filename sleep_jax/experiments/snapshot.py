"""The code a remote run executes: the repository's files, as git lists them, copied or packed.

XManager builds its container from a directory and Cloud TPU VMs fetch a tarball; both get the
same files: those git tracks plus the untracked ones it does not ignore (so the virtual
environment, runs/ and caches stay behind, and uncommitted edits go along); outside a git
checkout, the files that are not hidden, run outputs or build outputs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile

# Outside a git checkout: directories never shipped (besides hidden ones such as .venv, .git).
_NOT_SHIPPED = ("runs", "__pycache__", "build", "dist")


def source_files(repo: str) -> list[str]:
  """The repository's files, relative to `repo`, sorted: those git lists (tracked, or untracked
  and not ignored). Outside a git checkout (a copy without .git, or no git installed), every
  file except hidden ones and those under runs/, build/, dist/, __pycache__/ and *.egg-info/.
  """
  try:
    out = subprocess.run(
      ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
      cwd=repo,
      capture_output=True,
      check=True,
    ).stdout
    names = [name for name in out.decode().split("\0") if name]
  except (OSError, subprocess.CalledProcessError):
    names = []
    for directory, dirs, files in os.walk(repo):
      dirs[:] = sorted(
        d
        for d in dirs
        if not d.startswith(".") and d not in _NOT_SHIPPED and not d.endswith(".egg-info")
      )
      relative = os.path.relpath(directory, repo)
      for name in files:
        if not name.startswith("."):
          names.append(os.path.normpath(os.path.join(relative, name)).replace(os.sep, "/"))
  return sorted(name for name in names if os.path.isfile(os.path.join(repo, name)))


def tarball(repo: str, files: list[str]) -> bytes:
  """A gzipped tar of `files`, byte-identical for identical contents (fixed times and owners)."""
  buffer = io.BytesIO()
  with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as packed:
    with tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT) as tar:
      for name in files:
        info = tar.gettarinfo(os.path.join(repo, name), arcname=name)
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        with open(os.path.join(repo, name), "rb") as f:
          tar.addfile(info, f)
  return buffer.getvalue()


def revision(data: bytes) -> str:
  """A short content hash of a tarball: names its upload, so a rerun reuses it."""
  return hashlib.sha256(data).hexdigest()[:12]


def stage(repo: str, files: list[str], destination: str) -> str:
  """Copies `files` into `destination` (created), keeping their relative paths."""
  for name in files:
    target = os.path.join(destination, name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(os.path.join(repo, name), target)
  return destination
