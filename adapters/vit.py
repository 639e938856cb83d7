"""Vision transformers: timm's ViT/DeiT family and torchvision's VisionTransformer.

Units are the hidden neurons of every MLP (a row of fc1, the matching column of fc2) and the
attention heads of every timm `Attention` (that head's q, k and v rows of qkv, its columns of
proj). The embedding (residual-stream) dimension is never a unit: every LayerNorm reads it,
so zeroing it is not removing it (docs/architectures.md), and this is why the adapter builds its own
`UnitGraph` instead of using torch-pruning's groups, which would make the embedding a unit
and cannot express "one head" as one channel.

Cutting a unit zeroes the consumer's input columns (fc2 or proj). That equals removal
exactly: a neuron reaches the block output only through its fc2 column, and a head only
through its slice of proj's input, because heads are computed independently. Sites where
this fails are left out with the reason: a norm between the producer and the consumer
(timm `scale_norm`, an MLP `norm_layer`), and torchvision's `nn.MultiheadAttention`, whose
attention width must equal the embedding width, so a head cannot be removed from it (its
MLPs are still pruned). Other module types (timm's gated GluMlp/SwiGLU, Eva or Swin
attention) are not recognised and stay whole.

Removal is done here (`remove`), because a head is not a channel of a torch-pruning group;
`after_pruning` then re-derives `num_heads` and `attn_dim` from the weights. `head_dim`, and
so the attention scale 1/sqrt(head_dim), never changes: whole heads go.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from cswap.errors import ConfigError, ModelError
from cswap.hooks import trace_calls
from cswap.interfaces import ArchitectureAdapter, Layer, Unit, UnitGraph

HEADS, NEURONS = "heads", "neurons"


@dataclass
class Site:
    """Where units live: `producer` writes them (rows), `consumer` reads them (columns).

    A unit is `width` consecutive consumer columns; in the producer it is `copies` blocks of
    `width` rows, one per copy (q, k, v for heads), each copy `channels * width` rows long.
    """

    kind: str
    name: str  # layer name: the attention module (heads) or fc1 (neurons)
    producer: str
    consumer: str
    channels: int
    width: int = 1
    copies: int = 1
    gate: str | None = None  # timm gated attention: one more producer of the head's width
    why_not: str | None = None

    def rows(self, c: int) -> list[int]:
        span = self.channels * self.width
        return [s * span + c * self.width + i for s in range(self.copies) for i in range(self.width)]

    def cols(self, c: int) -> list[int]:
        return [c * self.width + i for i in range(self.width)]


def _timm_types():
    try:
        from timm.layers import Attention, Mlp
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # timm is a dependency, but keep torchvision models usable without it
        return None, None, ()
    return Attention, Mlp, (VisionTransformer,)


def _torchvision_types():
    from torchvision.models.vision_transformer import MLPBlock, VisionTransformer

    return MLPBlock, VisionTransformer


def find_sites(model: nn.Module) -> list[Site]:
    """Every MLP and attention module the adapter knows, in module order, prunable or not."""
    Attention, Mlp, _ = _timm_types()
    MLPBlock, _ = _torchvision_types()
    sites = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if Attention is not None and type(m) is Attention:
            sites.append(_timm_heads(prefix, m))
        elif Mlp is not None and type(m) is Mlp:
            sites.append(_mlp(prefix + "fc1", prefix + "fc2", m.fc1, m.fc2,
                              None if isinstance(m.norm, nn.Identity) else "a norm_layer between fc1 and fc2 mixes the neurons"))
        elif isinstance(m, MLPBlock):
            ok = len(m) == 5 and isinstance(m[0], nn.Linear) and isinstance(m[3], nn.Linear)
            sites.append(_mlp(prefix + "0", prefix + "3", m[0], m[3], None if ok else "unexpected MLPBlock layout"))
        elif isinstance(m, nn.MultiheadAttention):
            sites.append(Site(HEADS, name, prefix + "out_proj", prefix + "out_proj", m.num_heads,
                              why_not="nn.MultiheadAttention needs attention width == embedding width, "
                                      "so a head cannot be removed (its block's MLP is still pruned)"))
    return sites


def _timm_heads(prefix: str, attn: nn.Module) -> Site:
    why = None
    if not isinstance(attn.norm, nn.Identity):
        why = "a norm over the attention output (scale_norm) mixes the heads"
    elif not isinstance(attn.qkv, nn.Linear) or attn.qkv.out_features != 3 * attn.attn_dim:
        why = "qkv is not one fused Linear of 3 * attn_dim outputs"
    return Site(HEADS, prefix.rstrip("."), prefix + "qkv", prefix + "proj", attn.num_heads,
                width=attn.head_dim, copies=3, gate=prefix + "gate" if getattr(attn, "gate", None) is not None else None,
                why_not=why)


def _mlp(fc1_name: str, fc2_name: str, fc1: nn.Module, fc2: nn.Module, why: str | None) -> Site:
    if why is None and not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
        why = "fc1/fc2 are not nn.Linear"
    channels = fc1.out_features if isinstance(fc1, nn.Linear) else 0
    return Site(NEURONS, fc1_name, fc1_name, fc2_name, channels, why_not=why)


def _layer(site: Site, model: nn.Module, position: int) -> Layer:
    """The core's Layer for a site: `reads` are what the intervention zeroes (consumer
    columns), `frees` what removal deletes, so ParamLedger counts exactly."""
    modules = dict(model.named_modules())
    chans = range(site.channels)
    frees = []
    for producer in filter(None, (site.producer, site.gate)):
        copies = site.copies if producer == site.producer else 1
        for pname in ("weight", "bias"):
            if getattr(modules[producer], pname, None) is not None:
                frees.append((f"{producer}.{pname}", 0, [copies * site.width] * site.channels))
    frees.append((f"{site.consumer}.weight", 1, [site.width] * site.channels))
    return Layer(
        name=site.name,
        channels=site.channels,
        position=position,
        modules=[m for m in (site.producer, site.gate, site.consumer) if m],
        reads=[(f"{site.consumer}.weight", 1, [site.cols(c) for c in chans])],
        frees=frees,
    )


def _execution_order(model: nn.Module, names: Iterable[str], example_inputs: torch.Tensor) -> dict[str, int]:
    modules = dict(model.named_modules())
    was_training = model.training
    try:
        order = trace_calls(model.eval(), example_inputs, [modules[n] for n in names]).order
    finally:
        model.train(was_training)
    index = {m: n for n, m in modules.items()}
    return {index[m]: i for m, i in order.items()}


def _keep(weight_like: torch.Tensor, dim: int, drop: set[int]) -> nn.Parameter:
    keep = torch.tensor([i for i in range(weight_like.shape[dim]) if i not in drop], dtype=torch.long,
                        device=weight_like.device)
    return nn.Parameter(weight_like.detach().index_select(dim, keep).clone(), requires_grad=weight_like.requires_grad)


def _drop_rows(linear: nn.Linear, rows: set[int]) -> None:
    linear.weight = _keep(linear.weight, 0, rows)
    if linear.bias is not None:
        linear.bias = _keep(linear.bias, 0, rows)
    linear.out_features = linear.weight.shape[0]


def _drop_cols(linear: nn.Linear, cols: set[int]) -> None:
    linear.weight = _keep(linear.weight, 1, cols)
    linear.in_features = linear.weight.shape[1]


class _Call(nn.Module):
    """A stage that runs a piece of the model's own forward code (embedding, head). It holds
    the modules it runs as children, shared with the model, so an engine that looks for a
    layer's readers or caches module outputs in `stage.modules()` finds them; parameters
    outside modules (class token, position embedding) are read from the live model."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], label: str, owns: Iterable[nn.Module]):
        super().__init__()
        self._fn, self.label = fn, label
        self.owns = nn.ModuleList(owns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)

    def extra_repr(self) -> str:
        return self.label


class VitAdapter(ArchitectureAdapter):
    name = "vit"
    priority = 10
    removes_units = True  # heads are not channels of a torch-pruning group

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        heads: bool = True  # prune attention heads
        mlp: bool = True  # prune MLP hidden neurons
        ignored_layers: list[str] = []  # attention modules or fc1 layers to leave whole

    def matches(self, model: nn.Module) -> bool:
        _, _, timm_vits = _timm_types()
        return isinstance(model, (*timm_vits, _torchvision_types()[1]))

    # ---- units ------------------------------------------------------------------------
    def units(self, model: nn.Module, example_inputs: torch.Tensor) -> UnitGraph:
        sites = find_sites(model)
        if not sites:
            raise ModelError(f"{type(model).__name__} has no timm Attention/Mlp or torchvision MLPBlock: "
                             "use the generic adapter or an adapter written for it")
        names = {s.name for s in sites}
        unknown = sorted(set(self.options.ignored_layers) - names)
        if unknown:
            raise ConfigError(f"ignored_layers {unknown} are not attention or MLP layers; "
                              f"the vit adapter's layers are e.g. {sorted(names)[:4]}")
        skipped, usable = {}, []
        for s in sites:
            reason = s.why_not or self._excluded(s)
            if reason:
                skipped[s.name] = reason
            else:
                usable.append(s)
        order = _execution_order(model, [s.consumer for s in usable], example_inputs)
        layers = [_layer(s, model, order.get(s.consumer, -1)) for s in usable]
        layers.sort(key=lambda layer: (-layer.position, layer.name))
        return UnitGraph(layers, skipped, tuple(example_inputs.shape[1:]))

    def _excluded(self, site: Site) -> str | None:
        if site.name in self.options.ignored_layers:
            return "listed in ignored_layers"
        if site.kind == HEADS and not self.options.heads:
            return "head pruning is off (option heads: false)"
        if site.kind == NEURONS and not self.options.mlp:
            return "MLP pruning is off (option mlp: false)"
        return None

    # ---- removal --------------------------------------------------------------------
    def remove(self, model: nn.Module, units: Iterable[Unit]) -> None:
        """Physically delete `units` (numbered as on the unpruned model) and fix attributes.

        Called by `PruningPlan.apply_prefix` in place of torch-pruning's removal.
        """
        by_layer: dict[str, set[int]] = defaultdict(set)
        for u in units:
            by_layer[u.layer].add(u.channel)
        sites = {s.name: s for s in find_sites(model) if s.why_not is None}
        modules = dict(model.named_modules())
        for name, channels in by_layer.items():
            site = sites.get(name)
            if site is None:
                raise ModelError(f"{name!r} is not a prunable attention or MLP layer of {type(model).__name__}")
            if max(channels) >= site.channels:
                raise ModelError(f"{name!r} has {site.channels} units, asked to remove unit {max(channels)} "
                                 "(was the model already pruned?)")
            _drop_rows(modules[site.producer], {r for c in channels for r in site.rows(c)})
            if site.gate:
                _drop_rows(modules[site.gate], {r for c in channels for r in site.cols(c)})
            _drop_cols(modules[site.consumer], {k for c in channels for k in site.cols(c)})
        self.after_pruning(model)

    def after_pruning(self, model: nn.Module) -> None:
        """timm >= 1.0 reshapes q, k, v with `num_heads` and `head_dim` and the output with
        `attn_dim`; derive both from proj's input width. The scale stays 1/sqrt(head_dim)."""
        Attention, _, _ = _timm_types()
        for m in model.modules():
            if Attention is not None and type(m) is Attention:
                m.num_heads = m.proj.in_features // m.head_dim
                m.attn_dim = m.num_heads * m.head_dim

    # ---- stages ---------------------------------------------------------------------
    def stages(self, model: nn.Module) -> list[nn.Module]:
        """Embedding, each transformer block, then final norm and head."""
        _, _, timm_vits = _timm_types()
        if isinstance(model, timm_vits):
            def embed(x):
                return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

            def head(x):
                return model.forward_head(model.norm(x))

            return [_Call(embed, "embed", [model.patch_embed, model.norm_pre]), *model.blocks,
                    _Call(head, "head", [model.norm, model.fc_norm, model.head])]
        enc = model.encoder

        def tv_embed(x):
            x = model._process_input(x)
            x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
            return enc.dropout(x + enc.pos_embedding)

        return [_Call(tv_embed, "embed", [model.conv_proj]), *enc.layers,
                _Call(lambda x: model.heads(enc.ln(x)[:, 0]), "head", [enc.ln, model.heads])]
