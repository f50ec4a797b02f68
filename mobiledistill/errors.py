"""The configuration error every entry point turns into one line and exit code 2 (its own module, so that config,
strategies and runners can all raise it without importing each other)."""


class ConfigError(ValueError):
    """An impossible or inconsistent configuration value."""
