"""The policy's lower decoder layers, run once per rollout batch instead of at every forward.

LoRA sits on the top half of the layers (`lora.layer_fraction`), so the layers below it give the same hidden
states with the adapter on or off, before and after every update. PPO runs four forwards over each batch (old
logprobs, reference logprobs, one per epoch): it computes those lower states once, keeps them (16 answers x 170
tokens x 576 floats is 6 MB) and runs only the upper layers from them, the same numbers as the whole forward.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn


def frozen_layer_count(policy) -> int:
    """How many decoder layers lie below the first one holding a trainable weight (0 when it cannot tell)."""
    indices = [int(name.split(".layers.")[1].split(".")[0]) for name, param in policy.named_parameters()
               if param.requires_grad and ".layers." in name]
    return min(indices) if indices else 0


def _decoder(policy):
    """The causal LM under the PEFT wrapper and its decoder stack (`.layers`, `.norm`), or None for another shape."""
    causal_lm = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    decoder = getattr(causal_lm, "model", None)
    if not isinstance(getattr(decoder, "layers", None), nn.ModuleList) or not hasattr(causal_lm, "lm_head"):
        return None, None
    return causal_lm, decoder


@contextlib.contextmanager
def _only_layers(decoder, layers: slice, final_norm: bool):
    """Run `decoder` through `layers` alone (and without its final norm unless `final_norm`)."""
    all_layers, norm = decoder.layers, decoder.norm
    decoder.layers = nn.ModuleList(list(all_layers)[layers])
    if not final_norm:
        decoder.norm = nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = all_layers, norm


def positions(attention_mask: Tensor) -> Tensor:
    """(batch, T) position ids of left-padded rows: each row counts from its first real token."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)            # left padding must not shift positions


@torch.no_grad()
def lower_hidden(policy, ids: Tensor, attention_mask: Tensor, count: int) -> Tensor | None:
    """(batch, T, hidden): the output of the first `count` decoder layers; None when the model is not a plain
    decoder stack or nothing is frozen."""
    causal_lm, decoder = _decoder(policy)
    if decoder is None or count <= 0:
        return None
    with _only_layers(decoder, slice(0, count), final_norm=False):
        return decoder(input_ids=ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                       use_cache=False).last_hidden_state


def upper_forward(policy, hidden: Tensor, attention_mask: Tensor, count: int) -> tuple[Tensor, nn.Module]:
    """(last hidden states (batch, T, hidden) after the final norm, the LM head): the layers from `count` on,
    starting from `lower_hidden`'s output."""
    causal_lm, decoder = _decoder(policy)
    with _only_layers(decoder, slice(count, None), final_norm=True):
        out = decoder(inputs_embeds=hidden, attention_mask=attention_mask, position_ids=positions(attention_mask),
                      use_cache=False)
    return out.last_hidden_state, causal_lm.lm_head
