"""Session fixtures of the checkpoint area."""
