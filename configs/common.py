"""Config sections every task shares (big_vision style: helpers that fill a section).

Imported by the task configs as `from configs import common` (launch/ and tests put the
repository root on the path).
"""

from ml_collections import config_dict


def parallel() -> config_dict.ConfigDict:
  """`config.parallel`: the device mesh and how parameters are split over it.

  The mesh axes (sleep_jax/parallel/mesh.py): `data` splits the batch; `fsdp` splits the batch
  and the parameters (and their optimizer state); `tensor` splits heads and the MLP width.
  Sizes multiply to the number of devices of the whole job (every process); one may be -1
  (the rest). Examples: FSDP over 8 devices `--config.parallel.mesh.data=1
  --config.parallel.mesh.fsdp=8`; 2-way tensor parallelism `--config.parallel.mesh.tensor=2`.
  """
  c = config_dict.ConfigDict()
  c.mesh = config_dict.ConfigDict()
  c.mesh.data = -1  # -1: every device not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # Logical axis of a parameter dimension -> mesh axes (None: whole on every device). The batch
  # is always split over data x fsdp. A dimension must divide by its mesh axes' total size.
  c.rules = (("vocab", None), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
             ("head_dim", None), ("gate_heads", "tensor"), ("conv", None))
  return c
