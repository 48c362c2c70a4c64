"""twinstudio's tests (a package, so that `tests.*` resolves here and not to a `tests` package some dependency installs)."""
