"""The exception types that ``main.py`` prints as one line: bad user input, and a run that stops on purpose."""


class ConfigError(ValueError):
    """A problem the user fixes in a config, a path or the data; the message names the thing and the fix."""


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite losses); the message says where and what to do."""


def describe_names(keys: list[str], limit: int = 5) -> str:
    """The first ``limit`` names joined by commas, and how many more there are (for error messages)."""
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
