"""The trust boundary: what C-SWAP may execute, and the one way to widen it.

Why a module of its own: a run directory, a config or a checkpoint may come from someone
else, so C-SWAP reads every file a user names or receives as data (PyYAML's safe loader,
JSON, `torch.load(weights_only=True)`), and executes only the user's own Python and
installed packages (plugins, mmseg's own shipped configs). One kind of file is Python by
nature: an mmseg config `.py` of the user's own. Reading it runs it, so it is refused
unless the user opts in *when invoking C-SWAP* (`--trust-python-config` on the command
line, `trust_python_configs()` in Python). The opt-in is deliberately not a config field:
a config or a run directory that could switch it on would be a way to run code.

A context variable holds the opt-in, so it lasts exactly as long as the `with` block (or
the CLI command) and never leaks into another call.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

FLAG = "--trust-python-config"
API = "with cswap.trust.trust_python_configs(): ..."

_trusted: contextvars.ContextVar[bool] = contextvars.ContextVar("cswap_trust_python_configs", default=False)


def python_configs_trusted() -> bool:
    """True inside `trust_python_configs()` (or a CLI command given `--trust-python-config`)."""
    return _trusted.get()


@contextlib.contextmanager
def trust_python_configs(enabled: bool = True) -> Iterator[None]:
    """Let mmengine execute the user's own mmseg `.py` configs inside this block.

    Only for files you wrote or trust as you trust your own code: reading one runs it.
    `enabled=False` is a no-op block, so callers can pass a flag through."""
    token = _trusted.set(bool(enabled) or _trusted.get())
    try:
        yield
    finally:
        _trusted.reset(token)


def opt_in_hint() -> str:
    """How to opt in, for error messages (CLI and API)."""
    return f"pass {FLAG} (Python: {API}) only if you trust it as your own code"
