"""The gated delta rule: a per-token oracle, a chunked XLA form, and the `impl=` dispatching API."""
