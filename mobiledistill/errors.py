"""The configuration error every entry point turns into one line and exit code 2 (its own module, so that config,
strategies and runners can all raise it without importing each other)."""


class ConfigError(ValueError):
    """An impossible or inconsistent configuration value."""


def one_line_stderr() -> None:
    """Keeps a command's stderr to its own one-line error: tensorstore (under Orbax) can leave a coroutine of a
    failed checkpoint read un-awaited, and Python then prints a two-line RuntimeWarning at interpreter exit."""
    import warnings

    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
