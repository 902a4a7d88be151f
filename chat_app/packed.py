"""The CPU serving copy: fp32 weights packed once into oneDNN's blocked layout, and a lean Llama decode forward.

Where a CPU decode step's time goes (2-core AVX2, SmolLM2-135M, one pair, `run.py bench` and DESIGN.md):
- the weights: every step reads all 540 MB of them. Plain `F.linear` (MKL) streams them at about a third of the
  memory bandwidth when the batch is 2 rows; oneDNN's prepacked weights (what `torch.compile`'s CPU freezing pass
  uses) read them about twice as fast, and stay ahead at 16 rows. Same fp32 arithmetic: logits agree with the
  loaded model to ~1e-4, unlike bf16 or int8.
- everything else: HF's modules cost ~200 small kernel launches and Python calls per step. `PackedLlama` fuses
  q/k/v into one matrix and gate/up into another (7 -> 4 weight reads per layer) and runs the layers in one loop.

`torch.compile` of the decode step was tried here and dropped: 90 s to compile on 2 cores and no faster (88 ms).
A packed copy serves inference only; the base model stays as loaded for training, merging and plain `generate`.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BATCH_HINT = 2
"""oneDNN picks its blocking for this many rows; any row count works. 2 is one pair, the latency that matters."""


def available(model: nn.Module) -> bool:
    """Packing applies to fp32 models on CPU in a torch built with oneDNN."""
    parameter = next(model.parameters())
    quantized = getattr(model, "hf_quantizer", None) is not None     # bitsandbytes layers: served as loaded
    return (parameter.device.type == "cpu" and parameter.dtype == torch.float32 and not quantized
            and torch.backends.mkldnn.is_available())


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().float().contiguous(), BATCH_HINT)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """`nn.Linear` whose weight lives in oneDNN's packed layout (models other than Llama's shape)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", _pack(linear.weight), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.packed, self.bias)


@torch.no_grad()
def pack_linears(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place; pass a copy) by a `PackedLinear`; returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PackedLinear(child))
    return model.eval()


# -- a lean Llama for decoding ------------------------------------------------------------------------
def is_plain_llama(model: nn.Module) -> bool:
    """A Llama (SmolLM2's architecture) without biases or RoPE variants that `PackedLlama` does not implement."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        return False
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    return (not config.attention_bias and not config.mlp_bias and config.hidden_act == "silu"
            and rope == "default" and type(model).__name__ == "LlamaForCausalLM")


@dataclass
class _KV:
    keys: torch.Tensor
    values: torch.Tensor


class _Cache:
    """Per-layer keys and values, (rows, kv heads, columns, head dim): the shape `DecodeBatch` edits."""

    def __init__(self):
        self.layers: list[_KV] = []


@dataclass
class _Output:
    logits: torch.Tensor
    past_key_values: _Cache


@torch.no_grad()
def _effective_weight(linear: nn.Module) -> torch.Tensor:
    """A linear layer's weight with its active LoRA adapters folded in (PEFT layers are left as they are)."""
    base = getattr(linear, "base_layer", None)
    if base is None:
        return linear.weight.detach()
    weight = base.weight.detach()
    if not linear.disable_adapters and not linear.merged:
        for name in linear.active_adapters:
            if name in linear.lora_A:
                weight = weight + linear.get_delta_weight(name).to(weight.dtype)
    return weight


# layers_to_transform is plain LoRA too: the layers it leaves out have no tensors in the file, so no delta
_PLAIN_LORA_OFF = ("use_dora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern", "modules_to_save",
                   "trainable_token_indices", "use_qalora", "use_bdlora", "target_parameters")


@torch.no_grad()
def adapter_deltas(model: nn.Module, adapter_path: str | Path) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] | None:
    """What merging a saved LoRA adapter adds to each linear layer's weight, read straight from its files, as the
    factors (scaling·B, A) of the delta: a swap then needs no copy of the base model (540 MB for SmolLM2), no PEFT
    model around it, and builds one layer's delta at a time (`delta_weight`).

    None where the adapter is not plain LoRA on `nn.Linear` layers of `model` (DoRA, per-layer ranks, extra saved
    modules, other files): merge through PEFT then.
    """
    folder = Path(adapter_path)
    if not (folder / "adapter_model.safetensors").exists() or not (folder / "adapter_config.json").exists():
        return None
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA" or any(config.get(key) for key in _PLAIN_LORA_OFF):
        return None
    from safetensors.torch import load_file

    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / (r ** 0.5 if config.get("use_rslora") else r)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    prefix = "base_model.model."
    names = {key[:-len(".lora_A.weight")] for key in tensors if key.endswith(".lora_A.weight")}
    if not names or len(tensors) != 2 * len(names) or not all(n.startswith(prefix) for n in names):
        return None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    shared = embeddings.weight if embeddings is not None else None
    deltas = {}
    for name in names:
        try:
            module = model.get_submodule(name[len(prefix):])
        except AttributeError:
            return None
        lora_a, lora_b = tensors.get(name + ".lora_A.weight"), tensors.get(name + ".lora_B.weight")
        if type(module) is not nn.Linear or lora_b is None or module.weight is shared:
            return None                                                 # a tied lm_head: PEFT changes both
        if (lora_b.shape[0], lora_a.shape[1]) != module.weight.shape or lora_b.shape[1] != lora_a.shape[0]:
            return None
        weight = module.weight
        deltas[module] = ((lora_b.float() * scaling).to(weight.device), lora_a.float().to(weight.device))
    return deltas


def delta_weight(factors: tuple[torch.Tensor, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """scaling·B·A (PEFT's `get_delta_weight` for `nn.Linear`) in `like`'s dtype."""
    scaled_b, a = factors
    return (scaled_b @ a).to(like.dtype)


class PackedLlama(nn.Module):
    """Inference-only `LlamaForCausalLM` over packed weights, called the way `DecodeBatch` calls a HF model."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, deltas: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] | None = None):
        """`model`: a `LlamaForCausalLM`, possibly with PEFT LoRA layers inside (their active adapters are folded in);
        `deltas`: weight changes to fold in as well (`adapter_deltas`), keyed by the layer of `model`."""
        super().__init__()
        config = model.config
        self.config = config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        inner = model.model
        self.embed = inner.embed_tokens.weight.detach()
        self.inv_freq = inner.rotary_emb.inv_freq.detach().float()
        self.rope_scale = float(getattr(inner.rotary_emb, "attention_scaling", 1.0))
        self.layers = []
        deltas = deltas or {}

        def w(linear: nn.Module) -> torch.Tensor:
            weight = _effective_weight(linear)
            return weight + delta_weight(deltas[linear], weight) if linear in deltas else weight

        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight.detach(),
                _pack(torch.cat([w(attn.q_proj), w(attn.k_proj), w(attn.v_proj)])),
                _pack(w(attn.o_proj)),
                layer.post_attention_layernorm.weight.detach(),
                _pack(torch.cat([w(mlp.gate_proj), w(mlp.up_proj)])),
                _pack(w(mlp.down_proj)),
            ))
        self.norm = inner.norm.weight.detach()
        self.lm_head = _pack(w(model.lm_head))
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.intermediate = config.intermediate_size

    def parameters(self, recurse: bool = True):   # what callers read the device and dtype from
        yield self.embed

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: _Cache | None = None,
                use_cache: bool = True, logits_to_keep: int = 0) -> _Output:
        """input_ids (rows, new), attention_mask (rows, cached + new), position_ids (rows, new)."""
        rows, new = input_ids.shape
        cache = past_key_values if past_key_values is not None else _Cache()
        first = not cache.layers
        cached = 0 if first else cache.layers[0].keys.shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(rows, cached + new, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.cumsum(-1)[:, -new:] - 1).clamp(min=0)
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                     # (rows, 1, new, head dim)
        cos, sin = emb.cos() * self.rope_scale, emb.sin() * self.rope_scale
        keep = attention_mask.bool()[:, None, None, :]                       # (rows, 1, 1, columns)
        if new > 1:   # causal within the new tokens; a padded query reads itself so no row is all -inf
            columns = attention_mask.shape[1]
            causal = torch.ones(new, columns, dtype=torch.bool, device=input_ids.device).tril(columns - new)
            itself = torch.zeros_like(causal)
            itself[:, columns - new:] = torch.eye(new, dtype=torch.bool, device=input_ids.device)
            keep = (keep & causal) | itself
        x = F.embedding(input_ids, self.embed)
        for index, (norm1, qkv, o, norm2, gate_up, down) in enumerate(self.layers):
            h = _linear(self._norm(x, norm1), qkv)
            q, k, v = h.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = self._rotate(q.view(rows, new, self.heads, self.head_dim).transpose(1, 2), cos, sin)
            k = self._rotate(k.view(rows, new, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            v = v.view(rows, new, self.kv_heads, self.head_dim).transpose(1, 2)
            if first:
                cache.layers.append(_KV(k, v))
            else:
                kv = cache.layers[index]
                kv.keys, kv.values = torch.cat([kv.keys, k], dim=2), torch.cat([kv.values, v], dim=2)
                k, v = kv.keys, kv.values
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=self.scale, enable_gqa=True)
            x = x + _linear(a.transpose(1, 2).reshape(rows, new, self.q_size), o)
            g, u = _linear(self._norm(x, norm2), gate_up).split(self.intermediate, dim=-1)
            x = x + _linear(F.silu(g) * u, down)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return _Output(logits=_linear(self._norm(x, self.norm), self.lm_head), past_key_values=cache)


def policy_copy(policy: nn.Module) -> PackedLlama | None:
    """The policy as it is now (a PEFT model: active LoRA adapters folded in), packed for sampling rollouts;
    None where packing does not apply (CUDA, bf16, other architectures). Builds in ~0.6 s for SmolLM2."""
    inner = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    return PackedLlama(inner) if available(inner) and is_plain_llama(inner) else None


def serving_copy(model: nn.Module, adapter_path: str | None = None) -> nn.Module:
    """The packed inference copy of `model` with a LoRA adapter merged in: `PackedLlama` for Llamas."""
    if not available(model):
        raise ValueError("packed weights need an fp32 model on CPU and a torch built with oneDNN")
    if is_plain_llama(model):
        deltas = None if adapter_path is None else adapter_deltas(model, adapter_path)
        if adapter_path is None or deltas is not None:
            return PackedLlama(model, deltas)     # reads the base's weights, adds the deltas: no copy of the model
    work = copy.deepcopy(model)
    if adapter_path is not None:
        from peft import PeftModel

        work = PeftModel.from_pretrained(work, adapter_path).merge_and_unload()
    return PackedLlama(work) if is_plain_llama(work) else pack_linears(work)
