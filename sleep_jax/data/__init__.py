"""Tasks: pure numpy generators and grain pipelines."""
