"""Session fixtures of the build area."""
