"""The consolidation schedule: chunking, N passes per window, eviction."""
