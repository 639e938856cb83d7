"""The fallback adapter: any model torch-pruning can trace.

Units are the channels of torch-pruning's dependency groups, layers are ordered by when
their last producer runs, and channels that reach the model's output (the classifier head)
are never pruned. Modules named in `ignored_layers` keep all their output channels.

What cannot be handled fails early, at unit discovery, with the module named: an analysis
takes hours, so a model that torch-pruning cannot trace must be refused before it starts.
When torch-pruning's own tracing fails deep inside (e.g. its reshape index mapping on
ShuffleNet's channel shuffle), its traceback still holds the graph node it was working on;
the error names the model modules on either side of that node.
"""
from __future__ import annotations

from collections import deque

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from cswap.discovery import discover
from cswap.errors import ConfigError, ModelError, one_line
from cswap.interfaces import ArchitectureAdapter, UnitGraph


class GenericAdapter(ArchitectureAdapter):
    name = "generic"
    priority = -100  # tried last by `adapter: auto`

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        ignored_layers: list[str] = []

    def matches(self, model: nn.Module) -> bool:
        return True

    def ignored_layers(self, model: nn.Module) -> list[nn.Module]:
        modules = dict(model.named_modules())
        missing = [n for n in self.options.ignored_layers if n not in modules]
        if missing:
            close = [n for n in modules if n and any(m.split(".")[-1] in n for m in missing)][:5]
            raise ConfigError(f"ignored_layers names modules {type(model).__name__} does not have: {missing}"
                              + (f"; similar names: {close}" if close else ""))
        return [modules[n] for n in self.options.ignored_layers]

    def units(self, model: nn.Module, example_inputs: torch.Tensor) -> UnitGraph:
        try:
            return discover(model, example_inputs, ignored_layers=self.ignored_layers(model))
        except ConfigError:
            raise
        except MemoryError:  # the trace's graph is still referenced by the traceback: drop both, now
            raise ModelError(f"out of memory while torch-pruning traced {type(model).__name__} on an input of shape "
                             f"{tuple(example_inputs.shape)}: give a smaller example input (task input_shape), or "
                             "use an adapter that does not trace the model (see docs/architectures.md)") from None
        except Exception as exc:  # ModelError without a module, or torch-pruning's own errors
            cause = exc.__cause__ if isinstance(exc, ModelError) and exc.__cause__ is not None else exc
            where = torch_pruning_culprit(cause, model)
            if where is None:
                if isinstance(exc, ModelError):
                    raise
                raise ModelError(f"cannot find the pruning units of {type(model).__name__}: "
                                 f"{type(exc).__name__}: {one_line(exc)}") from exc
            raise ModelError(
                f"torch-pruning cannot trace {type(model).__name__} {where}: {type(cause).__name__}: {one_line(cause)}. "
                "Hint: tracing covers the whole model, so ignored_layers cannot skip this; "
                "make the operation a traceable one, or use or write an adapter for this "
                "architecture (see docs/architectures.md)."
            ) from exc

    def stages(self, model: nn.Module) -> list[nn.Module] | None:
        """An `nn.Sequential` is its own chain of stages; other models have no known chain."""
        return list(model) if isinstance(model, nn.Sequential) else None


def torch_pruning_culprit(exc: BaseException, model: nn.Module) -> str | None:
    """Where in `model` torch-pruning was when it raised `exc`: the innermost graph node
    in the traceback, described by the nearest named modules before and after it."""
    import torch_pruning as tp

    node, tb = None, exc.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("node")
        if isinstance(candidate, tp.dependency.Node):
            node = candidate
        tb = tb.tb_next
    if node is None:
        return None
    names = {m: n for n, m in model.named_modules() if n}
    if node.module in names:
        return f"at module {names[node.module]!r}"
    before = _nearest_named(node, names, "inputs")
    after = _nearest_named(node, names, "outputs")
    parts = [f"after module {before!r}" if before else "", f"before module {after!r}" if after else ""]
    return f"at operation {node.name} " + " and ".join(p for p in parts if p)


def _nearest_named(node, names: dict, direction: str) -> str | None:
    seen, queue = {id(node)}, deque(getattr(node, direction))
    while queue:
        n = queue.popleft()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.module in names:
            return names[n.module]
        queue.extend(getattr(n, direction))
    return None
