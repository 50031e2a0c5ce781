"""Sweeps and reports in cloud storage (an in-memory gs://, tests/fake_gcs.py): the grid files,
skip/resume, and a report read from and written to the bucket, equal to the local one."""

import os

import pytest
from fake_gcs import installed
from test_report import write_grid, write_run
from test_sweep import tiny_sweep, write_results

from sleep_jax import paths, rundir
from sleep_jax.experiments import report, sweeps


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with installed() as fake:
    yield fake
  assert not os.path.exists(tmp_path / "gs:")


def test_a_sweep_in_a_bucket_skips_finished_runs_and_writes_its_grid(gcs):
  sweep_dir = "gs://bucket/sweeps/tiny"
  trained = []

  def fake_train(config, workdir):
    trained.append(paths.relative(workdir, sweep_dir))
    assert rundir.read_json(paths.join(workdir, rundir.SWEEP_RUN_FILE))["seed"] == config.seed
    run = rundir.RunDir(workdir)
    run.write_results(
      rundir.Results(
        task="rule110",
        task_settings={"depth": config.task.depth},
        passes=config.sleep.passes,
        window=24,
        eviction="hard",
        pattern="AGAG",
        seed=config.seed,
        step=config.train.num_steps,
        num_steps=config.train.num_steps,
        tokens_seen=0,
        wall_s=1.0,
        eval={"exact_accuracy": 0.5},
      )
    )

  assert sweeps.run_sweep(tiny_sweep(seeds=(0,)), sweep_dir, train_fn=fake_train) == []
  assert trained == ["n1/depth1/seed0", "n2/depth1/seed0", "n1/depth2/seed0", "n2/depth2/seed0"]
  grid = rundir.read_json(paths.join(sweep_dir, rundir.SWEEP_FILE))
  assert grid["arms"] == ["n1", "n2"] and [r["workdir"] for r in grid["runs"]] == trained
  trained.clear()
  sweeps.run_sweep(tiny_sweep(seeds=(0,)), sweep_dir, train_fn=fake_train)
  assert trained == []  # every run finished: all skipped, read back from the bucket


def test_write_sweep_files_names_every_run_before_it_starts(gcs):
  sweep_dir = "gs://bucket/sweeps/tiny"
  sweeps.write_sweep_files(tiny_sweep(), sweep_dir, only="n2")
  files = set(gcs.files())
  assert f"{sweep_dir}/{rundir.SWEEP_FILE}" in files
  written = sorted(name for name in files if name.endswith(rundir.SWEEP_RUN_FILE))
  assert written == [
    f"{sweep_dir}/n2/depth{d}/seed{s}/{rundir.SWEEP_RUN_FILE}" for d in (1, 2) for s in (0, 1)
  ]
  assert len(rundir.read_json(f"{sweep_dir}/{rundir.SWEEP_FILE}")["runs"]) == 8


def test_a_report_of_a_sweep_in_a_bucket_equals_the_local_report(gcs, tmp_path):
  local = str(tmp_path / "local")
  for arm, seed, acc in (("n1", 0, 0.2), ("n2", 0, 0.6), ("n2", 1, 0.7)):
    metrics = {"loss": 1 - acc, "accuracy": acc, "exact_accuracy": acc}
    write_run(local, arm, seed, task="rule110", passes=int(arm[1]), depth=4, metrics=metrics)
  write_results(os.path.join(local, "n1", "depth4", "seed1"), 2, 10)  # no config.json: not a run
  write_grid(local, "configs/rule110.py:cpu", ["n1", "n2"], [0, 1], [4])
  remote = "gs://bucket/sweeps/fake"
  for directory, _, files in os.walk(local):
    for name in files:
      source = os.path.join(directory, name)
      paths.copy_file(source, paths.join(remote, os.path.relpath(source, local)))

  local_report = report.write_report(local, str(tmp_path / "local_out"), tensorboard=False)
  remote_report = report.write_report(remote)
  assert remote_report == f"{remote}/report.md"
  with open(local_report) as f:
    assert paths.read_text(remote_report) == f.read()
  files = gcs.files()
  pngs = [name for name in files if name.startswith(remote) and name.endswith(".png")]
  assert pngs and all(files[name].startswith(b"\x89PNG") for name in pngs)
  assert any(name.startswith(f"{remote}/report_tb/events.out.tfevents") for name in files)
  assert report.summary_table(remote) == report.summary_table(local)
