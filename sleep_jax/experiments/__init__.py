"""Top tier: running sweeps of runs on machines (jobs), and reading their results."""
