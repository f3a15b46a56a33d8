"""The package's exceptions: every bad input is a ValueError subclass that names the problem."""


class FastGenError(ValueError):
    """Base class for errors fastgen-compile raises on bad input."""


class ModelLoadError(FastGenError):
    """The model path, file or architecture cannot be loaded."""


class RequestError(FastGenError):
    """A request cannot be served as given (prompt, sampling values, length)."""


class ConfigError(FastGenError):
    """An engine setting is out of range or inconsistent."""


class CommandError(FastGenError):
    """A chat console command is unknown or has a bad value."""


class RecompileError(RuntimeError):
    """A compiled graph recompiled while serving (strict mode): a shape or guard changed in the hot path."""


class EngineDied(RuntimeError):
    """The engine loop hit an error or was closed; pending requests cannot complete."""


class ServerError(RuntimeError):
    """A server refused or failed a call (gRPC status code name, and its message)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
