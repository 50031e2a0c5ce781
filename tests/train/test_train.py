"""The trainer end to end on the `tiny` Rule 110 config: sharding, resume, outputs, bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import depo as depo_configs
from configs import rule110 as rule110_configs
from sleep_jax import rundir
from sleep_jax.data import tasks
from sleep_jax.model.config import EXACT_EXECUTION_FIELDS
from sleep_jax.model.lm import params_by_path
from sleep_jax.parallel import mesh as mesh_lib
from sleep_jax.train import loop
from sleep_jax.train import program as program_lib
from sleep_jax.train.config import ExperimentConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(configs=rule110_configs, **overrides):
  """The tiny variant with overrides written section__field (or section__sub__field)."""
  config = configs.get_config("tiny")
  for dotted, value in overrides.items():
    *sections, field = dotted.split("__")
    node = config
    for section in sections:
      node = node[section]
    node[field] = value
  return config


def train_log(workdir):
  return {line["step"]: line for line in rundir.RunDir(str(workdir)).train_log()}


def final_params(workdir, step):
  restored = ocp.StandardCheckpointer().restore(
    os.path.join(workdir, "checkpoints", str(step), "state")
  )
  return restored["params"]


MESHES = {
  "DP 8": dict(data=8),
  "FSDP 8": dict(data=1, fsdp=8),
  "data 4 x tensor 2": dict(data=4, tensor=2),
  "data 2 x fsdp 2 x tensor 2": dict(data=2, fsdp=2, tensor=2),
}
# CI's integration step runs the mesh that uses every axis; the rest are `slow` (~1 min each).
IN_CI = {("data 2 x fsdp 2 x tensor 2", "chunked")}


def _mesh_cases():
  for impl in ("chunked", "pallas"):
    for name in MESHES:
      marks = pytest.mark.integration if (name, impl) in IN_CI else pytest.mark.slow
      yield pytest.param(name, impl, marks=marks, id=f"{name}-{impl}")


def train_steps(config, devices, num_steps=3):
  """Losses and final parameters of `num_steps` train steps of the program for `devices`."""
  program = program_lib.build_program(config, devices)
  task = program.validated.task
  batches = iter(tasks.train_dataset(task, seed=config.seed, batch_size=config.train.batch_size))
  state, losses = program.init_state(), []
  for _ in range(num_steps):
    batch = mesh_lib.to_global_batch(next(batches), program.batch_sharding, config.train.batch_size)
    state, metrics = program.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params)


@pytest.mark.parametrize("mesh_name, impl", list(_mesh_cases()))
def test_every_mesh_matches_one_device(mesh_name, impl):
  assert jax.device_count() == 8  # tests/conftest.py fakes them
  config = tiny_config(model__fast_weight_impl=impl)
  losses_one, params_one = train_steps(config, jax.devices()[:1])
  config.parallel.mesh.update(MESHES[mesh_name])
  losses_many, params_many = train_steps(config, jax.devices())
  np.testing.assert_allclose(losses_many, losses_one, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_many, params_one
  )


def test_fsdp_and_tensor_parallelism_really_split_the_parameters():
  config = tiny_config(parallel__mesh__data=2, parallel__mesh__fsdp=2, parallel__mesh__tensor=2)
  program = program_lib.build_program(config)
  params = program.abstract_state.params
  shard_shape = lambda x: x.sharding.shard_shape(x.shape)
  # Block parameters are stacked over the pattern's R = 2 repetitions ("layers", unsplit).
  attention_q = params["blocks"][0]["mixer"]["q"]["kernel"]  # [layers 2, embed 32, heads 32]
  assert shard_shape(attention_q) == (2, 16, 16)  # embed over fsdp, heads over tensor
  mlp_down = params["blocks"][1]["mlp"]["down"]["kernel"]  # [layers 2, mlp 64, embed 32]
  assert shard_shape(mlp_down) == (2, 32, 16)
  # Optimizer moments mirror their parameter's split; the batch goes over data x fsdp.
  moments = [x for x in jax.tree.leaves(program.abstract_state.opt_state) if x.shape == (2, 32, 32)]
  assert moments and all(shard_shape(m) == (2, 16, 16) for m in moments)
  assert program.batch_sharding.shard_shape((16, 100)) == (4, 100)


def traced_train_step(config) -> tuple[program_lib.Program, str]:
  """The program on one CPU device and its train step's jaxpr, printed with every nested jaxpr."""
  program = program_lib.build_program(config, jax.devices()[:1])
  batch = program.abstract_batch(config.train.batch_size)
  with jax.set_mesh(program.mesh):
    traced = program.train_step.__wrapped__.trace(program.abstract_state, batch)
  return program, str(traced.jaxpr)


def test_on_a_cpu_the_steps_trace_the_chunked_form_and_the_config_keeps_auto():
  auto = tiny_config()
  assert auto.model.fast_weight_impl == "auto"
  program, traced = traced_train_step(auto)
  assert program.validated.model.fast_weight_impl == "auto"
  assert "platform_index" not in traced and "pallas_call" not in traced  # no kernel branches
  assert traced == traced_train_step(tiny_config(model__fast_weight_impl="chunked"))[1]


@pytest.mark.integration
def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path):
  steps = dict(train__num_steps=6)
  straight = loop.train_and_evaluate(tiny_config(**steps), str(tmp_path / "straight"))
  # Killed after step 3: the last checkpoint is step 2, so step 3 is redone on resume.
  loop.train_and_evaluate(tiny_config(**steps), str(tmp_path / "resumed"), stop_after_step=3)
  assert max(train_log(tmp_path / "resumed")) == 3
  resumed = loop.train_and_evaluate(tiny_config(**steps), str(tmp_path / "resumed"))
  assert resumed["step"] == straight["step"] == 6
  assert resumed["eval"] == straight["eval"]
  log_a, log_b = train_log(tmp_path / "straight"), train_log(tmp_path / "resumed")
  assert [log_a[s]["loss"] for s in range(1, 7)] == [log_b[s]["loss"] for s in range(1, 7)]
  jax.tree.map(
    np.testing.assert_array_equal,
    final_params(tmp_path / "resumed", 6),
    final_params(tmp_path / "straight", 6),
  )


@pytest.mark.integration
def test_main_pulse_writes_checkpoints_events_and_results(tmp_path):
  workdir = tmp_path / "pulse"
  out = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "launch", "main.py"),
      "--config=" + os.path.join(REPO, "configs", "rule110.py") + ":tiny",
      f"--workdir={workdir}",
      "--config.sleep.passes=2",
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  files = os.listdir(workdir)
  assert {"config.json", "results.json", rundir.TRAIN_LOG_FILE} <= set(files)
  assert any(f.startswith("events.out.tfevents") for f in files)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  results = json.loads((workdir / "results.json").read_text())
  rundir.Results.from_json(results)  # matches the schema
  assert results["task"] == "rule110" and results["passes"] == 2 and results["window"] == 24
  assert results["task_settings"] == {"depth": 1} and results["num_steps"] == 4
  assert results["step"] == 4 and results["tokens_seen"] == 4 * 16 * 100 and results["wall_s"] > 0
  assert {"loss", "accuracy", "exact_accuracy", "label_accuracy/0", "label_accuracy/3"} <= set(
    results["eval"]
  )
  # Per-depth slices (task.eval_depths = (1, 3) in the tiny config), flat float keys.
  depth_keys = {f"depth{t}/{m}" for t in (1, 3) for m in ("exact_accuracy", "loss", "accuracy")}
  assert depth_keys <= set(results["eval"])
  assert all(isinstance(results["eval"][k], float) for k in depth_keys)
  assert results["eviction"] == "hard" and results["pattern"] == "AGAG"
  # One eval line per evaluation (every 2 steps), the last equal to results.json's.
  eval_lines = [
    json.loads(line) for line in (workdir / rundir.EVAL_LOG_FILE).read_text().splitlines()
  ]
  assert [line["step"] for line in eval_lines] == [2, 4]
  assert eval_lines[-1] == {"step": 4, **results["eval"]}
  assert "step 4/4" in out.stderr and "tok/s" in out.stderr and "ETA" in out.stderr
  assert "finished rule110 at step 4/4" in out.stderr and "depth3/exact_accuracy" in out.stderr


@pytest.mark.parametrize(
  "overrides, error, message",
  [
    (dict(task__name="rule111"), ValueError, "unknown task.name"),
    (dict(model__pattern="AGZ"), ValueError, "pattern"),
    (dict(sleep__passes=0), ValueError, "passes"),
    (dict(sleep__window=25), ValueError, "does not tile"),
    (dict(task__depth=-1), ValueError, "depth"),
    (
      dict(train__batch_size=12),
      ValueError,
      r"not divisible by the batch shards data x fsdp = 8 x 1",
    ),
    (dict(parallel__mesh__data=3), ValueError, "multiplies to 3, but there are 8 devices"),
    (
      dict(parallel__mesh__data=2, parallel__mesh__fsdp=-1, parallel__mesh__tensor=-1),
      ValueError,
      "at most one is -1",
    ),
    (
      dict(parallel__mesh__tensor=8, parallel__mesh__data=1),
      ValueError,
      "model.num_heads=2 is not divisible by parallel.mesh.tensor=8",
    ),
    (
      dict(parallel__mesh__fsdp=8, parallel__mesh__data=1, model__d_model=36, model__head_dim=18),
      ValueError,
      r"parameter .* dimension \d \(36\) is split over mesh axes \('fsdp',\)",
    ),
    (dict(sleep__conv_state="sometimes"), ValueError, "unknown sleep.conv_state"),
    (dict(sleep__context_len=72), ValueError, "context_len"),
    (dict(sleep__eviction="none", sleep__passes=2), ValueError, "passes must be 1"),
    (dict(task__eval_depths=(2, -1)), ValueError, "eval_depths"),
    (dict(eval__num_slice_examples=24), ValueError, "num_slice_examples"),
    (dict(sleep__halt="sometimes"), ValueError, "unknown sleep.halt"),
    (dict(sleep__halt="converge", sleep__halt_tol=-1.0), ValueError, "sleep.halt_tol"),
    (dict(sleep__halt="learned", sleep__ponder_cost=-1.0), ValueError, "sleep.ponder_cost"),
    (
      dict(sleep__halt="learned", model__pattern="AAAA"),
      ValueError,
      "has no gated-delta block",
    ),
  ],
)
def test_bad_input_fails_before_anything_is_written(tmp_path, overrides, error, message):
  with pytest.raises(error, match=message):
    loop.train_and_evaluate(tiny_config(**overrides), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_incompatible_workdir_is_refused_and_left_untouched(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  saved = json.dumps(tiny_config().to_dict())
  (workdir / "config.json").write_text(saved)
  with pytest.raises(rundir.WorkdirError, match="incompatible config.*model"):
    loop.train_and_evaluate(tiny_config(model__d_model=48), str(workdir))
  assert (workdir / "config.json").read_text() == saved
  assert os.listdir(workdir) == ["config.json"]


@pytest.mark.integration
def test_corrupt_checkpoint_is_a_clear_error_and_is_kept(tmp_path):
  workdir = tmp_path / "run"
  loop.train_and_evaluate(tiny_config(train__num_steps=2), str(workdir))
  state_dir = workdir / "checkpoints" / "2" / "state"
  for root, _, names in os.walk(state_dir):
    for name in names:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(RuntimeError, match="could not be restored"):
    loop.train_and_evaluate(tiny_config(train__num_steps=4), str(workdir))
  assert (workdir / "checkpoints" / "2").exists()


@pytest.mark.integration
def test_a_learned_halting_run_reports_the_passes_it_used(tmp_path, caplog):
  """The model gets a halting unit; the eval log, results.json (main set and every depth
  slice) and the closing table hold passes_mean and the histogram; the train log the ponder
  objective beside the cross-entropy."""
  workdir = tmp_path / "learned"
  config = tiny_config(sleep__passes=3, sleep__halt="learned", sleep__ponder_cost=0.1)
  with caplog.at_level("INFO", logger="sleep_jax"):
    results = loop.train_and_evaluate(config, str(workdir))
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["halting_unit"] is True and "halting" in final_params(str(workdir), 4)
  for prefix in ("", "depth1/", "depth3/"):
    mean = results["eval"][f"{prefix}passes_mean"]
    hist = [results["eval"][f"{prefix}passes_hist/{n}"] for n in (1, 2, 3)]
    assert 1.0 <= mean <= 3.0 and sum(hist) == pytest.approx(1.0)
    assert mean == pytest.approx(sum(n * h for n, h in zip((1, 2, 3), hist, strict=True)))
  logged = train_log(workdir)[4]
  assert 1.0 <= logged["passes_mean"] <= 3.0 and logged["objective"] > logged["loss"]
  assert "passes_mean" in caplog.text and "passes_hist/3" in caplog.text  # the closing table


@pytest.mark.integration
def test_a_learned_halting_run_can_start_from_a_run_without_a_halting_unit(tmp_path):
  source = tmp_path / "plain"
  loop.train_and_evaluate(tiny_config(train__num_steps=1, sleep__passes=2), str(source))
  config = tiny_config(sleep__passes=2, sleep__halt="learned")
  config.init_from = str(source)
  params = program_lib.build_program(config).init_state().params
  saved = final_params(str(source), 1)
  assert not np.any(params["halting"]["kernel"]) and not np.any(params["halting"]["bias"])
  started, saved = params_by_path(params), params_by_path(saved)
  assert set(started) - set(saved) == {"halting/bias", "halting/kernel"}
  for path, value in saved.items():
    np.testing.assert_array_equal(started[path], value)


@pytest.mark.integration
def test_depo_run_reports_per_hop_metrics(tmp_path):
  workdir = tmp_path / "depo"
  # The reference scan compiles in about half the time of "auto" (chunked) at these sizes.
  config = tiny_config(depo_configs, model__fast_weight_impl="reference")
  results = loop.train_and_evaluate(config, str(workdir))
  assert results["task"] == "depo" and results["window"] == 75 and results["step"] == 2
  assert results["tokens_seen"] == 2 * 16 * 360
  hop_keys = {f"hops{k}/{m}" for k in (1, 16) for m in ("loss", "accuracy")}
  assert hop_keys | {"loss", "accuracy", "exact_accuracy", "answer_accuracy"} <= set(
    results["eval"]
  )
  assert all(isinstance(v, float) and np.isfinite(v) for v in results["eval"].values())
  assert json.loads((workdir / "results.json").read_text())["eval"] == results["eval"]
  assert [f"label_accuracy/{i}" for i in range(10)] == sorted(
    k for k in results["eval"] if k.startswith("label_accuracy/")
  )


@pytest.mark.parametrize(
  "pattern, eviction, sees_context",
  [
    ("AAAA", "hard", False),  # the attention-only floor: evicted tokens are gone
    ("AAAA", "none", True),  # the full-attention ceiling: attention sees every token
    ("AGAG", "hard", True),  # the hybrid: the context reaches the queries via the fast state
  ],
)
def test_baselines_see_the_context_exactly_when_they_should(pattern, eviction, sees_context):
  import sleep_jax

  config = tiny_config(model__pattern=pattern, sleep__eviction=eviction)
  model = sleep_jax.build_model(config.model, seed=0)
  tokens = tasks.get_task(config.task).generate(np.random.default_rng(0), 4)["tokens"]
  other = tokens.copy()
  other[:, :96] = np.random.default_rng(1).integers(0, 2, size=(4, 96))  # new strings, same queries
  predict = lambda t: np.asarray(sleep_jax.apply(model, t, sleep_config=config.sleep))[:, 96:]
  if sees_context:
    assert np.abs(predict(tokens) - predict(other)).max() > 1e-4
  else:
    np.testing.assert_array_equal(predict(tokens), predict(other))


def test_baseline_overrides_validate_on_depo():
  for overrides in (dict(sleep__eviction="none"), dict(model__pattern="AAAA")):
    validated = program_lib.validate(tiny_config(depo_configs, **overrides), num_devices=8)
    assert validated.task.context_len == validated.sleep.context_len == 300
  validated = program_lib.validate(tiny_config(depo_configs, sleep__eviction="none"), 8)
  assert len(validated.sleep.chunks(validated.task.seq_len)) == 1


def test_changing_only_evaluation_slices_keeps_a_workdir_compatible(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(tiny_config().to_dict()))
  run = rundir.RunDir(str(workdir))
  run.check_compatible_config(tiny_config(task__eval_depths=(2, 4, 8)).to_dict())
  run.check_compatible_config(tiny_config(train__muon_lr=1e-4, train__num_steps=9).to_dict())
  with pytest.raises(rundir.WorkdirError, match="incompatible config.*task"):
    run.check_compatible_config(tiny_config(task__depth=2).to_dict())


def test_a_run_saved_before_a_field_existed_resumes_under_its_default(tmp_path):
  typed = lambda **overrides: ExperimentConfig.from_config(tiny_config(**overrides))
  config = typed()
  saved = config.to_dict()
  for field in ("loop_norm", "loop_repeats", "sliding_window"):  # added after the first runs
    del saved["model"][field]
  del saved["sleep"]["conv_state"]
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(saved))
  run = rundir.RunDir(str(workdir))
  run.check_compatible_config(config.to_dict(), defaults=config.field_defaults())
  carry = typed(sleep__conv_state="carry")
  with pytest.raises(rundir.WorkdirError, match="conv_state: saved 'reset' vs new 'carry'"):
    run.check_compatible_config(carry.to_dict(), defaults=carry.field_defaults())
  looped = typed(model__loop_repeats=2)
  with pytest.raises(rundir.WorkdirError, match="loop_repeats: saved 1 vs new 2"):
    run.check_compatible_config(looped.to_dict(), defaults=looped.field_defaults())
  # Recomputing blocks gives the same values: a resumed run may switch it, when told so.
  remat = typed(model__remat_blocks=True)
  exact = tuple(f"model.{field}" for field in EXACT_EXECUTION_FIELDS)
  run.check_compatible_config(remat.to_dict(), remat.field_defaults(), may_differ=exact)
  with pytest.raises(rundir.WorkdirError, match="remat_blocks: saved False vs new True"):
    run.check_compatible_config(remat.to_dict(), defaults=remat.field_defaults())
