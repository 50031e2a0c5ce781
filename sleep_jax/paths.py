"""Paths that may be local or in cloud storage (`gs://bucket/...`): one place for file access.

Every file a run or a sweep reads or writes outside its checkpoints (config.json, the JSON-lines
logs, results.json, sweep.json, reports and figures, TensorBoard events, `init_from`'s
model.json, a tokenizer.json) goes through these functions. Local paths take the standard
library as before; a path with a scheme (`gs://`, also `s3://`) goes through etils.epath, which
orbax already uses for checkpoints (installed with orbax and grain), so nothing ever lands in a
local folder named `gs:`. epath reaches `gs://` through fsspec, which needs `gcsfs` installed on
the machine that runs the job (the launchers' containers and TPU VMs install it).

Cloud storage has objects, not files, and that changes two operations:
  * a write is atomic by itself (an object appears whole when its upload completes), so
    `write_text` writes remote objects directly and local files through a rename;
  * an object cannot be appended to, so `append_text` rewrites a remote object with the new
    text added (the JSON-lines logs are small: a line per logged step).
Leaf module: etils.epath and the standard library only; imports neither JAX nor the trainer.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` names cloud storage (it has a scheme, e.g. gs://bucket/run)."""
  return "://" in os.fspath(path)


def check_available(path: str) -> None:
  """Raises RuntimeError, naming the package to install, when this machine cannot reach the
  storage of `path` (gs:// needs gcsfs); local paths always pass."""
  if not is_remote(path):
    return
  import fsspec  # installed with etils' users (orbax, grain); only remote paths need it

  scheme = os.fspath(path).split("://", 1)[0]
  try:
    fsspec.get_filesystem_class({"gs": "gcs"}.get(scheme, scheme))
  except (ImportError, ValueError) as e:
    package = {"gs": "gcsfs", "s3": "s3fs"}.get(scheme, f"fsspec's {scheme} filesystem")
    raise RuntimeError(
      f"{path}: this machine cannot reach {scheme}:// storage ({e}); python -m pip install {package}"
    ) from e


def absolute(path: str) -> str:
  """An absolute local path, or the remote path unchanged (os.path.abspath would make
  `gs://b/r` into `<cwd>/gs:/b/r`)."""
  return path if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  """`path/part/...`; remote paths always join with `/`."""
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def relative(path: str, start: str) -> str:
  """`path` relative to the directory `start`, with `/` separators (both local or both remote)."""
  if is_remote(path) != is_remote(start):
    raise ValueError(f"{path!r} and {start!r} are not both local or both remote")
  if is_remote(path):
    return posixpath.relpath(path.split("://", 1)[1], start.split("://", 1)[1])
  return os.path.relpath(path, start).replace(os.sep, "/")


def exists(path: str) -> bool:
  return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  """Creates a directory and its parents (remote: what the storage needs, often nothing)."""
  if is_remote(path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
  """The file's bytes (FileNotFoundError when it is missing)."""
  if is_remote(path):
    return epath.Path(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  """The file's text (FileNotFoundError when it is missing)."""
  return read_bytes(path).decode()


@contextlib.contextmanager
def open_atomic(path: str, mode: str = "w") -> Iterator[IO]:
  """A file to write `path` through: a reader sees the old file or the new one, never a mix.

  Local files are written beside the target and renamed over it when the block ends without
  an error (and removed when it raises); a remote object is uploaded whole when the block
  ends, and the storage replaces it atomically.

  Args:
    path: the file to write.
    mode: "w" (text) or "wb".
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"open_atomic writes with mode 'w' or 'wb', got {mode!r}")
  if is_remote(path):
    buffer = io.StringIO() if mode == "w" else io.BytesIO()
    yield buffer
    data = buffer.getvalue()
    epath.Path(path).write_bytes(data.encode() if mode == "w" else data)
    return
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` whole, atomically (`open_atomic`)."""
  with open_atomic(path, "wb") as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  """Writes `text` whole, atomically (`open_atomic`)."""
  with open_atomic(path) as f:
    f.write(text)


def append_text(path: str, text: str) -> None:
  """Appends `text` (flushed to the OS locally; remote: the object rewritten with it added)."""
  if not is_remote(path):
    with open(path, "a") as f:
      f.write(text)
    return
  target = epath.Path(path)
  old = target.read_bytes() if target.exists() else b""
  target.write_bytes(old + text.encode())


def remove(path: str) -> None:
  if is_remote(path):
    epath.Path(path).unlink()
  else:
    os.remove(path)


def copy_file(source: str, destination: str) -> None:
  """Copies one file; either side may be remote (overwrites)."""
  if not is_remote(source) and not is_remote(destination):
    shutil.copyfile(source, destination)
  else:
    write_bytes(destination, read_bytes(source))


def walk(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
  """(directory, subdirectories, files) below `top`, top-down, like os.walk; remove names
  from the subdirectories list to skip them."""
  if not is_remote(top):
    yield from os.walk(top)
    return
  root = epath.Path(top)
  if not root.is_dir():
    return
  pending = [root]
  while pending:
    directory = pending.pop(0)
    children = sorted(directory.iterdir(), key=lambda p: p.name)
    dirs = [c.name for c in children if c.is_dir()]
    files = [c.name for c in children if not c.is_dir()]
    yield os.fspath(directory), dirs, files
    pending.extend(directory / name for name in dirs)


class StagedDir:
  """A local directory for writers that need real files (tensorboardX's event files), whose
  files `sync()` copies into `target`. For a local target it is the target itself.

  Copies are whole files: an event file is uploaded again at each sync, as tensorboardX's own
  gs:// writer does at each flush, so sync at a cadence (evaluations, a minute), not per step.
  """

  def __init__(self, target: str):
    self.target = target
    self.remote = is_remote(target)
    self.local = tempfile.mkdtemp(prefix="sleep_jax_staged_") if self.remote else target
    self._synced: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) last copied

  def sync(self) -> list[str]:
    """Copies the files that changed since the last sync; returns their remote paths."""
    if not self.remote:
      return []
    copied = []
    for directory, _, files in os.walk(self.local):
      for name in sorted(files):
        local = os.path.join(directory, name)
        relative_path = os.path.relpath(local, self.local).replace(os.sep, "/")
        stat = os.stat(local)
        if self._synced.get(relative_path) == (stat.st_size, stat.st_mtime_ns):
          continue
        destination = join(self.target, relative_path)
        copy_file(local, destination)
        self._synced[relative_path] = (stat.st_size, stat.st_mtime_ns)
        copied.append(destination)
    return copied

  def close(self) -> None:
    """Syncs a last time and removes the local copy."""
    if self.remote:
      try:
        self.sync()
      finally:
        shutil.rmtree(self.local, ignore_errors=True)
