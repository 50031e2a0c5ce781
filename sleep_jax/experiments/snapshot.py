"""The code a remote run executes: the repository's files, as git lists them, copied or packed.

XManager builds its container from a directory and Cloud TPU VMs fetch a tarball; both get the
same files: those git tracks plus the untracked ones it does not ignore (so the virtual
environment, runs/ and caches stay behind, and uncommitted edits go along).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile


def source_files(repo: str) -> list[str]:
  """The repository's files, relative to `repo`, sorted.

  Raises:
    RuntimeError: `repo` is not a git checkout (or git is missing), naming the fix.
  """
  try:
    out = subprocess.run(
      ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
      cwd=repo,
      capture_output=True,
      check=True,
    ).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise RuntimeError(
      f"cannot list the files of {repo} with git ({e}); remote runs ship the files git lists, "
      "so launch from a git checkout"
    ) from e
  names = [name for name in out.decode().split("\0") if name]
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
