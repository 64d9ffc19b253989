"""Planning a benchmark command: its options, the loss registry and its overrides, the work to do."""
