"""Errors a user can act on. The CLI prints their message and exits non-zero, no traceback."""


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
