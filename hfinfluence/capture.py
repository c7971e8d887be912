"""Find the layers to track and capture their per-token inputs a_t and output-gradients e_t.

One forward+backward pass over a batch fires, for every tracked module, a callback with
``a`` of shape [batch, tokens, d_in] (a ones column appended when the layer has a bias) and ``e`` of
shape [batch, tokens, d_out] with e_t = ∂(Σ_i loss_i)/∂y_t. Because each example's loss only reaches its
own outputs, e restricted to example i is exactly ∂loss_i/∂y, so the per-example layer gradient is
G_i = Σ_t e_{i,t} a_{i,t}ᵀ (shape [d_out, d_in]) — never formed here, only handed on.
Padding tokens (``attention_mask == 0``) are zeroed in both a and e.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, NoTrackableModuleError, SharedModuleError, UnsupportedModuleError

try:  # GPT-2 style layers store the weight as [d_in, d_out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()


@dataclass
class TrackedModule:
    """A layer whose gradient is captured. ``d_in`` counts the bias column when there is one."""

    name: str
    module: nn.Module
    kind: str
    d_in: int
    d_out: int
    has_bias: bool


def _describe(module: nn.Module) -> tuple[str, int, int, bool] | None:
    if isinstance(module, nn.Linear):
        kind, d_in, d_out = "linear", module.in_features, module.out_features
    elif Conv1D and isinstance(module, Conv1D):
        kind, (d_in, d_out) = "conv1d", module.weight.shape
    else:
        return None
    has_bias = module.bias is not None and module.bias.requires_grad
    return kind, d_in + int(has_bias), d_out, has_bias


def _inside_module_list(name: str, list_names: list[str]) -> bool:
    return any(name.startswith(prefix + ".") for prefix in list_names)


def _trainable_leaf(module: nn.Module) -> bool:
    has_children = next(module.children(), None) is not None
    return not has_children and any(p.requires_grad for p in module.parameters(recurse=False))


def find_tracked_modules(
    model: nn.Module, patterns: list[str] | None = None, *, allow_shared: bool = False
) -> dict[str, TrackedModule]:
    """Resolve the modules to track, in forward-registration order.

    ``patterns=None`` selects every trainable Linear / Conv1D below an ``nn.ModuleList`` (the decoder
    blocks), which covers peft LoRA A/B layers and skips their frozen base layers, embeddings and the
    LM head. With patterns, each must match at least one module name (``fnmatch``), and a matched
    trainable leaf of an unsupported kind is refused rather than silently skipped.
    """
    named = dict(model.named_modules())
    if patterns is None:
        list_names = [n for n, m in named.items() if isinstance(m, nn.ModuleList)]
        selected = [n for n in named if _inside_module_list(n, list_names)]
    else:
        selected = []
        for pattern in patterns:
            hits = [n for n in named if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                examples = ", ".join(list(named)[1:6])
                raise ConfigError(
                    f"`modules` pattern {pattern!r} matches no module of {type(model).__name__}; "
                    f"names look like: {examples} …"
                )
            selected += [n for n in hits if n not in selected]

    tracked, unsupported = {}, []
    for name in selected:
        module = named[name]
        info = _describe(module)
        if info is None:
            if patterns is not None and _trainable_leaf(module):
                unsupported.append(f"{name} ({type(module).__name__})")
            continue
        if not module.weight.requires_grad:
            continue
        kind, d_in, d_out, has_bias = info
        tracked[name] = TrackedModule(name, module, kind, d_in, d_out, has_bias)

    if unsupported:
        raise UnsupportedModuleError(
            "These modules match `modules` but only nn.Linear, GPT-2 Conv1D and peft LoRA layers can be "
            f"tracked: {', '.join(unsupported)}. Narrow the patterns, e.g. ['*.mlp.*', '*.self_attn.*']."
        )
    if not tracked:
        hint = "" if patterns is None else f" with `modules`={patterns}"
        raise NoTrackableModuleError(
            f"{type(model).__name__} has no trainable nn.Linear / Conv1D / LoRA layer to track{hint}. "
            "Check that its weights require grad, or name the layers with `InfluenceConfig(modules=[...])`."
        )
    if not allow_shared:
        _refuse_shared(model, tracked)
    return tracked


def _refuse_shared(model: nn.Module, tracked: dict[str, TrackedModule]) -> None:
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    shared = []
    for name, info in tracked.items():
        names = owners.get(id(info.module.weight), [])
        if len(names) > 1:
            others = ", ".join(n for n in names if n != f"{name}.weight")
            shared.append(f"{name} (weight also used as {others})")
    if shared:
        raise SharedModuleError(
            f"Tied or shared weights: {'; '.join(shared)}. A tied layer's captured gradient is only part of its "
            "parameter's gradient. Leave it out of `modules`, or pass `allow_shared=True` to score that part."
        )


GradientCallback = Callable[[TrackedModule, torch.Tensor, torch.Tensor], None]


class GradientCapture:
    """Context manager: hooks that hand (module, a, e) to ``callback`` during backward.

    >>> with GradientCapture(tracked, callback) as capture:   # doctest: +SKIP
    ...     capture.set_token_mask(batch["attention_mask"])
    ...     loss = model(**inputs).logits.sum()
    ...     torch.autograd.grad(loss, capture.outputs)
    """

    def __init__(self, tracked: dict[str, TrackedModule], callback: GradientCallback, *, allow_shared=False):
        self.tracked = tracked
        self.callback = callback
        self.allow_shared = allow_shared
        self.outputs: list[torch.Tensor] = []
        self.token_mask: torch.Tensor | None = None
        self.calls: dict[str, int] = {}
        self.enabled = True
        self._handles = []

    def __enter__(self) -> GradientCapture:
        self.enabled = True
        for info in self.tracked.values():
            self._handles.append(info.module.register_forward_hook(self._forward_hook(info)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.outputs.clear()
        self.enabled = False  # tensor hooks on a retained graph stay silent in later backward passes

    def set_token_mask(self, mask: torch.Tensor) -> None:
        """Start a new pass; ``mask`` [batch, tokens] is 1 on real tokens, 0 on padding."""
        self.token_mask = mask
        self.outputs.clear()
        self.calls = {name: 0 for name in self.tracked}

    def _forward_hook(self, info: TrackedModule):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            if torch._C._current_graph_task_id() != -1:
                # Called during a backward pass: non-reentrant activation checkpointing re-running the forward.
                # The first forward's output already carries the gradient hook; this re-run is not a new call.
                return
            self.calls[info.name] = self.calls.get(info.name, 0) + 1
            if self.calls[info.name] > 1 and not self.allow_shared:
                raise SharedModuleError(
                    f"Module {info.name} is called more than once per forward pass. Its gradient sums over all "
                    "calls; pass `allow_shared=True` to treat each call's tokens as extra tokens, or untrack it."
                )
            activations = inputs[0].detach()
            if info.has_bias:
                ones = activations.new_ones(*activations.shape[:-1], 1)
                activations = torch.cat([activations, ones], dim=-1)
            output.register_hook(lambda grad: self._on_gradient(info, activations, grad))
            self.outputs.append(output)

        return hook

    def _on_gradient(self, info: TrackedModule, activations: torch.Tensor, grad: torch.Tensor) -> None:
        if not self.enabled:
            return
        mask = self.token_mask
        a, e = _as_batch_tokens(activations, mask, info), _as_batch_tokens(grad.detach(), mask, info)
        if mask is not None:
            weight = mask.to(device=a.device, dtype=a.dtype).unsqueeze(-1)
            a, e = a * weight, e * weight.to(e.dtype)
        self.callback(info, a, e)


def _as_batch_tokens(x: torch.Tensor, mask: torch.Tensor | None, info: TrackedModule) -> torch.Tensor:
    if mask is None or x.shape[:-1] == mask.shape:
        return x
    if x.shape[:-1].numel() == mask.numel():
        return x.reshape(*mask.shape, x.shape[-1])
    raise UnsupportedModuleError(
        f"Module {info.name} sees inputs of shape {tuple(x.shape)}, which do not line up with the batch's "
        f"tokens {tuple(mask.shape)}; only layers applied per token can be tracked. Leave it out of `modules`."
    )
