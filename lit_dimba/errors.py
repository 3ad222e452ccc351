"""The one exception type for bad user input (config values, paths, data); ``main.py`` prints it as one line."""


class ConfigError(ValueError):
    """A problem the user fixes in a config, a path or the data; the message names the thing and the fix."""
