"""Session fixtures of the triton area."""
