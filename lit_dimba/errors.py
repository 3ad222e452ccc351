"""The one exception type for bad user input (config values, paths, data); ``main.py`` prints it as one line."""


class ConfigError(ValueError):
    """A problem the user fixes in a config, a path or the data; the message names the thing and the fix."""


def describe_names(keys: list[str], limit: int = 5) -> str:
    """The first ``limit`` names joined by commas, and how many more there are (for error messages)."""
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
