"""Session fixtures of the server area."""
