"""An in-memory Google Cloud Storage for tests: fsspec's memory filesystem registered for gs://.

etils.epath (and so sleep_jax.paths) reaches gs:// through `fsspec.filesystem("gcs")`, which is
gcsfs in production. `installed()` puts this class there instead, with gcsfs' path conventions
("bucket/key", no leading slash), so every gs:// path a test writes lands in `FakeGCS.store` and
nothing reaches the network or the local disk.
"""

import contextlib
import importlib

import fsspec
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
  protocol = ("gs", "gcs")
  root_marker = ""
  cachable = False
  store: dict = {}
  pseudo_dirs: list = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = fsspec.utils.stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return path.strip("/")

  def __init__(self, *args, finalize_on_close=False, **kwargs):  # gcsfs' option, unused here
    del finalize_on_close
    super().__init__(*args, **kwargs)

  @classmethod
  def files(cls) -> dict[str, bytes]:
    """Every object: "gs://bucket/key" -> its bytes."""
    return {f"gs://{key}": value.getvalue() for key, value in cls.store.items()}


@contextlib.contextmanager
def installed():
  """gs:// and gcs:// go to an empty FakeGCS while open (then back to gcsfs)."""
  registry = importlib.import_module("fsspec.registry")._registry  # the writable registry
  saved = {name: registry.get(name) for name in ("gs", "gcs")}
  FakeGCS.store, FakeGCS.pseudo_dirs = {}, [""]
  for name in saved:
    registry[name] = FakeGCS
  epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()
  try:
    yield FakeGCS
  finally:
    for name, value in saved.items():
      if value is None:
        registry.pop(name, None)
      else:
        registry[name] = value
    epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()
