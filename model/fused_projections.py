"""Each layer's query, key and value projections as one matrix product, and each MLP's gate and up
projections as another.

At batch 1 a decode step of the release is bound by how many kernels it runs, not by bandwidth: on an H100 it
took 5.5 ms against 2.7 ms of matrix products (GPU run 5), and an H200, with 1.4x the bandwidth, was about as
fast. Most of its 197 matrix products come with a cuBLAS split-K reduction; fused, a layer's seven become
four (q/k/v, o, gate/up, down) and their inputs are read once.

The weights are concatenated once, in place: the original projections' weights become views into the fused
tensor, so memory does not grow and either forward can run on the same model (engines may share one model;
use_fused_projections switches at each generate call, as use_fused_rms_norms does). Fuse after the model is
on its device and dtype: moving it would copy the views apart. Each fused projection is a bias-free
nn.Linear of its module (`fused_qkv`, `fused_gate_up`), so model.int8_weights gives it int8 weights as it
does every other projection: its parts' int8 rows, stacked the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.models.higgs_audio_v2 import modeling_higgs_audio_v2 as higgs

from model.forward_override import override_forward


def stack_rows(modules: list[torch.nn.Module], name: str) -> torch.Tensor:
    """One tensor of `modules`' `name` tensors stacked by output rows, theirs now views into it (a
    Parameter stays a Parameter): no memory held twice, and each module's own forward still runs."""
    stacked = torch.cat([getattr(module, name).detach() for module in modules], dim=0)
    start = 0
    for module in modules:
        part = getattr(module, name)
        rows = stacked[start : start + part.shape[0]]
        if isinstance(part, torch.nn.Parameter):
            rows = torch.nn.Parameter(rows, requires_grad=False)
        setattr(module, name, rows)
        start += part.shape[0]
    return stacked


def _fuse(linears: list[torch.nn.Linear]) -> torch.nn.Linear | None:
    """One projection for `linears` (stacked by output), their weights now views into its; it keeps them as
    `parts` (model.int8_weights stacks their int8 weights the same way). None if any has a bias."""
    if any(linear.bias is not None for linear in linears):
        return None
    weight = stack_rows(linears, "weight")
    fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    fused.parts = tuple(linears)  # a tuple: not registered as fused's submodules, they stay the layer's
    return fused


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.fused_gate_up(x).chunk(2, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def _attention_forward(
    self,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # HiggsAudioV2Attention.forward (transformers 5.23) with its three projections as one.
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    sizes = [part.out_features for part in self.fused_qkv.parts]
    query, key, value = self.fused_qkv(hidden_states).split(sizes, dim=-1)
    query_states = query.view(hidden_shape).transpose(1, 2)
    key_states = key.view(hidden_shape).transpose(1, 2)
    value_states = value.view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    query_states, key_states = higgs.apply_rotary_pos_emb(query_states, key_states, cos, sin)
    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

    attention_interface: Callable = higgs.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, higgs.eager_attention_forward
    )
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _fuse_attention(module) -> bool:
    if not hasattr(module, "fused_qkv"):
        module.fused_qkv = _fuse([module.q_proj, module.k_proj, module.v_proj])
    return module.fused_qkv is not None


def _fuse_mlp(module) -> bool:
    if not hasattr(module, "fused_gate_up"):
        module.fused_gate_up = _fuse([module.gate_proj, module.up_proj])
    return module.fused_gate_up is not None


# Each module type that fuses: how its weights are concatenated once (whether they could be), and the
# forward that uses them.
_FUSIBLE = {
    higgs.HiggsAudioV2Attention: (_fuse_attention, _attention_forward),
    higgs.HiggsAudioV2MLP: (_fuse_mlp, _mlp_forward),
}


def use_fused_projections(model: torch.nn.Module, fused: bool = True) -> int:
    """Run `model`'s attention and MLP projections fused (or, with fused=False, as transformers wrote them
    again). Returns how many modules run fused."""
    count = 0
    for module in model.modules():
        if type(module) not in _FUSIBLE:
            continue
        prepare, forward = _FUSIBLE[type(module)]
        on = fused and prepare(module)
        override_forward(module, forward if on else None)
        count += on
    return count
