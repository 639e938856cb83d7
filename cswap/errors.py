"""Errors a user can act on. The CLI prints their message on one line and exits with status 2,
no traceback (`--debug` shows it)."""


class CSwapError(Exception):
    """Base class of errors caused by input (config, data, model), not by a bug."""


class ConfigError(CSwapError):
    """The configuration names an unknown field, plugin or value."""


class DataError(CSwapError):
    """The data cannot give what the analysis needs (missing root, too few samples...)."""


class ModelError(CSwapError):
    """The model cannot be built, loaded, traced or pruned as asked."""


class NumericalError(CSwapError):
    """Scores became NaN or infinite, so no statistical decision is meaningful."""


class ResourceError(CSwapError):
    """The device cannot hold even the smallest batch the analysis needs."""


class OutputError(CSwapError):
    """A run directory or file cannot be written: a file in the way, no permission, a full
    disk, a directory locked by another run, or recorded work that would be thrown away."""


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a run. A KeyboardInterrupt, so no `except Exception` swallows
    it and every `finally` runs (the analysis state is saved on the way out)."""

    def __init__(self, signum: int, partial=None):
        import signal

        self.signum = signum
        self.partial = partial  # the resumable `<run>.partial`, once the run has one
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to `limit` characters: errors a user reads
    (CSwapError messages, skip reasons) are one line each."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_summary(exc) -> str:
    """A pydantic ValidationError on one line: `field: message` for each error, `; `-separated."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
