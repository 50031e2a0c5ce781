"""Top tier: config files and overrides, sweeps of runs, job placement, and reports.

It reads run directories through `sleep_jax.rundir` and never loads the trainer to do so:
importing `sleep_jax.experiments.report` or `.sweeps` pulls neither JAX, orbax nor grain. Only
`run_sweep` trains, through the function it is given (launch/sweep.py passes the trainer).
"""
