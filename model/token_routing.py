"""Prefill's split of tokens between the text and the audio weights, without stopping the GPU.

Every decoder layer of Higgs Audio v2 sends text tokens through one pair of norms and MLP and audio tokens
through another. transformers' HiggsAudioV2DecoderLayer selects them with boolean masks
(`hidden_states[audio_token_mask]` and the assignments through it), eight selections a layer: each counts
the mask's True entries on the GPU and waits for the count before it can size its output, so the CPU stops
queueing kernels 224 times in a prefill of the release (28 layers), and the GPU idles while it catches up.
A small prefill (a refill of a few rows) pays for those round trips on top of its arithmetic.

Here the mask becomes two index lists once per forward (all layers get the same mask object), and each layer
gathers and scatters with them: the same rows through the same kernels in the same order, so the results
are bit for bit those of transformers' layer (tests/test_token_routing.py). Decode steps never take this path:
they hold audio tokens only and pass no mask.
"""

from __future__ import annotations

import threading
import weakref

import torch
from transformers.models.higgs_audio_v2 import modeling_higgs_audio_v2 as higgs

from model.forward_override import override_forward

_routes = threading.local()  # the last forward's mask (a weak reference) and its index lists


def _indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(audio, text) positions of a (batch, tokens) mask in the flattened tokens, computed once per mask."""
    last = getattr(_routes, "last", None)
    if last is not None and last[0]() is mask:
        return last[1], last[2]
    flat = mask.reshape(-1)
    order = torch.argsort((~flat).to(torch.int8), stable=True)  # audio positions first, each kind in order
    audio_count = int(flat.sum())  # the forward's one wait for the GPU
    audio, text = order[:audio_count], order[audio_count:]
    _routes.last = (weakref.ref(mask), audio, text)
    return audio, text


def _layer_forward(
    self,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    attention_mask: torch.Tensor | None = None,
    audio_token_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values=None,
    use_cache: bool | None = False,
    **kwargs,
) -> torch.Tensor:
    # HiggsAudioV2DecoderLayer.forward (transformers 5.23), its mask selections as index_select/index_copy_.
    if audio_token_mask is None:
        return higgs.HiggsAudioV2DecoderLayer.forward(
            self,
            hidden_states,
            position_embeddings,
            attention_mask=attention_mask,
            audio_token_mask=None,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
    audio, text = _indices(audio_token_mask)
    residual = hidden_states
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    normed = torch.empty_like(flat)
    normed.index_copy_(0, audio, self.audio_input_layernorm(flat.index_select(0, audio)))
    normed.index_copy_(0, text, self.input_layernorm(flat.index_select(0, text)))
    hidden_states, _ = self.self_attn(
        hidden_states=normed.view_as(residual),
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    hidden_states = residual + hidden_states
    flat = hidden_states.view(-1, hidden_states.shape[-1])
    text_states = flat.index_select(0, text)
    audio_states = flat.index_select(0, audio)
    text_states = text_states + self.mlp(self.post_attention_layernorm(text_states))
    audio_states = audio_states + self.audio_mlp(self.audio_post_attention_layernorm(audio_states))
    flat.index_copy_(0, text, text_states)
    flat.index_copy_(0, audio, audio_states)
    return hidden_states


def use_indexed_routing(model: torch.nn.Module, indexed: bool = True) -> int:
    """Route every decoder layer's tokens by index lists (or, with indexed=False, by transformers' boolean
    masks again). Returns how many layers there are."""
    layers = [m for m in model.modules() if isinstance(m, higgs.HiggsAudioV2DecoderLayer)]
    for layer in layers:
        override_forward(layer, _layer_forward if indexed else None)
    return len(layers)
