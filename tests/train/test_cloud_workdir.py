"""A run whose workdir is gs://, on an in-memory GCS (tests/fake_gcs.py): everything but the
checkpoints lands in the bucket, and nothing in a local folder named `gs:`.

Orbax writes a gs:// checkpoint directory itself, through tensorstore's GCS driver, which no
fake filesystem reaches; the test checks that orbax is handed the gs:// path and then keeps the
checkpoints in a local directory.
"""

import os

import pytest
from fake_gcs import installed

from configs import rule110 as rule110_configs
from sleep_jax import rundir
from sleep_jax.train import checkpoint, loop


@pytest.mark.integration
def test_a_run_in_a_bucket_writes_its_files_there_and_resumes_from_them(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  handed = []
  make_manager = checkpoint.make_manager

  def local_checkpoints(run, *, max_to_keep):
    handed.append(run.checkpoints)
    return make_manager(
      rundir.RunDir(str(tmp_path / "checkpoints_of_the_bucket_run")), max_to_keep=max_to_keep
    )

  monkeypatch.setattr(loop.ckpt, "make_manager", local_checkpoints)
  config = rule110_configs.get_config("tiny")
  workdir = "gs://bucket/sweeps/tiny/n1/seed0"
  with installed() as gcs:
    first = loop.train_and_evaluate(config, workdir, stop_after_step=3)
    assert first["step"] == 2  # the last evaluation before the stop
    results = loop.train_and_evaluate(config, workdir)  # resumes: config.json from the bucket
    files = gcs.files()
  assert handed == [f"{workdir}/checkpoints"] * 2
  assert results["step"] == 4 and rundir.Results.from_json(results).finished
  names = {name.removeprefix(workdir + "/") for name in files}
  assert {"config.json", "results.json", rundir.TRAIN_LOG_FILE, rundir.EVAL_LOG_FILE} <= names
  assert any(name.startswith("events.out.tfevents") for name in names)
  assert os.listdir(tmp_path) == ["checkpoints_of_the_bucket_run"]  # no ./gs: and nothing else
