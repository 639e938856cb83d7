"""The fallback adapter: any model torch-pruning can trace.

Units are the channels of torch-pruning's dependency groups, layers are ordered by when
their last producer runs, and channels that reach the model's output (the classifier head)
are never pruned. Modules named in `ignored_layers` keep all their output channels.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from torch import nn

from cswap.errors import ConfigError
from cswap.interfaces import ArchitectureAdapter


class GenericAdapter(ArchitectureAdapter):
    name = "generic"
    priority = -100  # tried last by `adapter: auto`

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        ignored_layers: list[str] = []

    def __init__(self, options: "GenericAdapter.Options | None" = None, **_):
        self.options = options or self.Options()

    def matches(self, model: nn.Module) -> bool:
        return True

    def ignored_layers(self, model: nn.Module) -> list[nn.Module]:
        modules = dict(model.named_modules())
        missing = [n for n in self.options.ignored_layers if n not in modules]
        if missing:
            raise ConfigError(f"ignored_layers names modules the model does not have: {missing}")
        return [modules[n] for n in self.options.ignored_layers]
