"""What a run compiles, built once from its config: the mesh, shardings and jitted steps.

`build_program(config, devices)` is shared by the training loop and by ahead-of-time
compilation for a TPU topology (launch/aot.py), so both compile exactly the same train step:
the same mesh, parameter and batch shardings, and kernel dispatch. Nothing is allocated here:
parameter shapes come from `jax.eval_shape`, and the state is an abstract tree carrying its
shardings (the restore target too).

The steps must be traced and called under `with jax.set_mesh(program.mesh)` (the `in_mesh`
wrappers do it, with the split `config.parallel.rules` give the heads in context), so that the
fused kernels run per shard (sleep_jax.ops.partition).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sleep_jax.data import tasks
from sleep_jax.model.config import ModelConfig
from sleep_jax.model.lm import build_model
from sleep_jax.ops import partition
from sleep_jax.ops.attention import api as attention_api
from sleep_jax.ops.gated_delta.api import resolve_impl
from sleep_jax.parallel import mesh as mesh_lib
from sleep_jax.sleep.config import SleepConfig
from sleep_jax.train import checkpoint
from sleep_jax.train.config import ExperimentConfig
from sleep_jax.train.optim import global_norm, make_optimizer, optimizer_labels
from sleep_jax.train.step import TrainState, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class Validated:
  """The typed pieces of a config that passed every static check."""

  task: tasks.Task
  model: ModelConfig
  sleep: SleepConfig


def validate(config, num_devices: int, num_processes: int = 1) -> Validated:
  """Every static check, before anything is compiled.

  Each section was already checked on its own when typed (sleep_jax.train.config); these
  are the checks across sections and against the job's devices.

  Args:
    config: the run's ConfigDict or ExperimentConfig.
    num_devices: devices of the whole job (every process), which the mesh covers.
    num_processes: processes of the job, each making its own rows of every batch.

  Raises:
    ValueError: naming the field and the fix.
  """
  config = ExperimentConfig.from_config(config)
  task = tasks.get_task(config.task)
  model_cfg, sleep_cfg = config.model, config.sleep
  if model_cfg.vocab_size < task.vocab_size:
    raise ValueError(
      f"model.vocab_size={model_cfg.vocab_size} < {task.name}'s {task.vocab_size} tokens"
    )
  if sleep_cfg.context_len != task.context_len:
    raise ValueError(
      f"sleep.context_len={sleep_cfg.context_len} but {task.name} sleeps on "
      f"{task.context_len} tokens before its prediction chunk"
    )
  sleep_cfg.check_sequence(task.seq_len)
  data, fsdp, tensor = mesh_lib.mesh_shape(config.parallel.mesh, num_devices)
  for name, size in (
    ("model.num_heads", model_cfg.num_heads),
    ("model.mlp_dim", model_cfg.mlp_dim),
  ):
    if size % tensor:
      raise ValueError(
        f"{name}={size} is not divisible by parallel.mesh.tensor={tensor}: "
        "tensor parallelism splits heads and the MLP width"
      )
  for name, size in (
    ("train.batch_size", config.train.batch_size),
    ("eval.batch_size", config.eval.batch_size),
  ):
    if size % (data * fsdp):
      raise ValueError(
        f"{name}={size} is not divisible by the batch shards data x fsdp = "
        f"{data} x {fsdp}; change it or parallel.mesh"
      )
    if name == "train.batch_size" and size % (num_processes * tasks.EXAMPLES_PER_BLOCK):
      raise ValueError(
        f"{name}={size}: each of the {num_processes} processes makes its own rows "
        f"of a batch in blocks of {tasks.EXAMPLES_PER_BLOCK} examples, so it must "
        f"be a multiple of {num_processes * tasks.EXAMPLES_PER_BLOCK}"
      )
  return Validated(task, model_cfg, sleep_cfg)


@dataclasses.dataclass(frozen=True)
class Program:
  """The compiled pieces of a run and the shardings they expect."""

  config: ExperimentConfig
  validated: Validated
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  optimizer: optax.GradientTransformation
  abstract_state: TrainState  # ShapeDtypeStructs with shardings
  batch_sharding: jax.sharding.NamedSharding
  train_step: Callable  # jitted (state, batch) -> (state, metrics); the state is donated
  eval_step: Callable  # jitted (params, batch) -> prediction sums

  @property
  def state_shardings(self) -> Any:
    return jax.tree.map(lambda x: x.sharding, self.abstract_state)

  def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch's shapes, dtypes and sharding (what `train_step` is lowered with)."""
    task = self.validated.task
    example = task.generate(np.random.default_rng(0), 1)
    return {
      name: jax.ShapeDtypeStruct(
        (batch_size, *value.shape[1:]), value.dtype, sharding=self.batch_sharding
      )
      for name, value in example.items()
    }

  def init_state(self) -> TrainState:
    """The train state at step 0, created directly in its shardings: freshly initialised, or
    from `config.init_from`'s parameters with a fresh optimizer state."""
    model_cfg, seed = self.validated.model, self.config.seed
    if self.config.init_from:
      params = checkpoint.load_initial(self.config.init_from, model_cfg, self.abstract_state.params)
      start = functools.partial(_start_state, optimizer=self.optimizer)
      with jax.set_mesh(self.mesh):
        return jax.jit(start, out_shardings=self.state_shardings)(params)
    make = lambda: _fresh_state(model_cfg, seed, self.optimizer)
    with jax.set_mesh(self.mesh):
      return jax.jit(make, out_shardings=self.state_shardings)()


def _start_state(params, optimizer) -> TrainState:
  """Step 0 from these parameters, with a fresh optimizer state."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def _fresh_state(model_cfg: ModelConfig, seed: int, optimizer) -> TrainState:
  return _start_state(nnx.to_pure_dict(nnx.state(build_model(model_cfg, seed=seed))), optimizer)


def in_mesh(mesh: jax.sharding.Mesh, jitted: Callable, op_split: dict | None = None) -> Callable:
  """`jitted`, traced and run with `mesh` in context (`.lower` too, for AOT compilation), and
  with the fused ops' split in context (`mesh_lib.op_split` of the run's rules)."""

  def in_context():
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    if op_split is not None:
      stack.enter_context(partition.split_axes(**op_split))
    return stack

  @functools.wraps(jitted)
  def call(*args):
    with in_context():
      return jitted(*args)

  def lower(*args):
    with in_context():
      return jitted.lower(*args)

  call.lower = lower
  return call


def build_program(config, devices: Sequence[Any] | None = None) -> Program:
  """Validates `config` and builds its mesh, abstract state and jitted steps over `devices`.

  Args:
    config: the run's ConfigDict or ExperimentConfig.
    devices: the job's devices (default every device of every process); TPU topology devices
      from sleep_jax.parallel.topology compile ahead of time on any host.
  """
  config = ExperimentConfig.from_config(config)
  devices = list(jax.devices() if devices is None else devices)
  validated = validate(config, len(devices), len({d.process_index for d in devices}))
  mesh = mesh_lib.make_mesh(config.parallel, devices)
  # The steps are lowered for `devices` only. On CPUs "auto" stands for "chunked" and "xla":
  # naming them traces none of the GPU and TPU kernels' branches (half the CPU train step's
  # jaxpr and trace time). On accelerators "auto" is resolved when lowering (a "gpu" device may
  # be CUDA or ROCm). The saved config keeps the names it was given.
  step_model = validated.model
  if devices[0].platform == "cpu":
    step_model = dataclasses.replace(
      step_model,
      fast_weight_impl=resolve_impl(step_model.fast_weight_impl, "cpu"),
      attention_impl=attention_api.resolve_impl(step_model.attention_impl, "cpu"),
    )
  abstract_model = nnx.eval_shape(lambda: build_model(step_model, seed=config.seed))
  graphdef, abstract_params = nnx.split(abstract_model)
  param_shardings = mesh_lib.param_shardings(abstract_params, mesh, config.parallel.rules)
  labels = optimizer_labels(abstract_params, config.train.trainable)
  optimizer = make_optimizer(dataclasses.asdict(config.train), labels)
  replicated = mesh_lib.replicated(mesh)
  shapes = jax.eval_shape(functools.partial(_fresh_state, validated.model, config.seed, optimizer))
  # Optimizer moments are sharded like the parameters they mirror; counters are replicated.
  shardings = TrainState(
    step=replicated,
    params=param_shardings,
    opt_state=mesh_lib.shardings_by_param_path(
      shapes.opt_state, param_shardings, default=replicated
    ),
  )
  abstract_state = jax.tree.map(
    lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
    shapes,
    shardings,
  )
  batch_sharding = mesh_lib.batch_sharding(mesh)
  train_step = make_train_step(
    graphdef=graphdef,
    sleep_cfg=validated.sleep,
    optimizer=optimizer,
    state_shardings=shardings,
    batch_sharding=batch_sharding,
    replicated=replicated,
    grad_norm=functools.partial(global_norm, labels=labels),
  )
  eval_step = make_eval_step(
    graphdef=graphdef,
    sleep_cfg=validated.sleep,
    param_shardings=param_shardings,
    batch_sharding=batch_sharding,
    replicated=replicated,
  )
  return Program(
    config=config,
    validated=validated,
    mesh=mesh,
    graphdef=graphdef,
    optimizer=optimizer,
    abstract_state=abstract_state,
    batch_sharding=batch_sharding,
    train_step=in_mesh(mesh, train_step, mesh_lib.op_split(config.parallel.rules)),
    eval_step=in_mesh(mesh, eval_step, mesh_lib.op_split(config.parallel.rules)),
  )
