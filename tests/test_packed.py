"""The packed CPU serving copy computes what the loaded model computes; the sampler draws from the right law."""
import pytest
import torch

from chat_app.chat import encode_prompt
from chat_app.config import ConfigError, load_config
from chat_app.decoding import decode, left_pad, sample_tokens
from chat_app.model import load_model
from chat_app.packed import PackedLlama, adapter_deltas, pack_linears, serving_copy

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")


def prompts(tokenizer, *texts):
    return [encode_prompt(tokenizer, [{"role": "user", "content": t}], 200)[0] for t in texts]


def padded_logits(model, batch, pad_id):
    ids, mask = left_pad(batch, pad_id, "cpu")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits, mask


def test_packed_llama_matches_the_model_on_a_padded_batch(tiny_config, tokenizer):
    model = load_model(tiny_config.model, tokenizer)
    fast = serving_copy(model)
    assert isinstance(fast, PackedLlama)
    batch = prompts(tokenizer, "hi", "a much longer question, to make the other row padded")
    expected, mask = padded_logits(model, batch, tokenizer.pad_token_id)
    got, _ = padded_logits(fast, batch, tokenizer.pad_token_id)
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-4), (got[real] - expected[real]).abs().max()
    assert torch.isfinite(got).all()                      # padded positions too: no NaN leaks into the cache


def test_packed_decode_gives_the_models_answers(tiny_config, tokenizer):
    model = load_model(tiny_config.model, tokenizer)
    batch = prompts(tokenizer, "a", "a much longer question about things", "third")
    args = dict(max_new_tokens=[12] * 3, temperature=[0.0] * 3, top_p=[1.0] * 3, seeds=[0] * 3,
                eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    assert decode(serving_copy(model), batch, **args) == decode(model, batch, **args)
    sampled = dict(args, temperature=[0.9] * 3, seeds=[1, 2, 3])
    assert decode(serving_copy(model), batch, **sampled) == decode(model, batch, **sampled)


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_a_merged_adapter_and_the_generic_packing_match_peft(tiny_config, tokenizer, tmp_path, variant):
    from peft import LoraConfig, get_peft_model

    adapter = get_peft_model(load_model(tiny_config.model, tokenizer),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                        init_lora_weights=False, use_rslora=variant == "rslora",
                                        use_dora=variant == "dora"))
    adapter.save_pretrained(tmp_path / "v1")
    base = load_model(tiny_config.model, tokenizer)
    before = {name: p.clone() for name, p in base.named_parameters()}
    # plain LoRA is merged from the adapter's files without a copy of the base; DoRA goes through PEFT
    assert (adapter_deltas(base, tmp_path / "v1") is None) == (variant == "dora")
    batch = prompts(tokenizer, "merged or not?", "and a second, longer row of text")
    expected, mask = padded_logits(adapter, batch, tokenizer.pad_token_id)
    got, _ = padded_logits(serving_copy(base, str(tmp_path / "v1")), batch, tokenizer.pad_token_id)
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-4)
    assert all(torch.equal(p, before[name]) for name, p in base.named_parameters())   # the base is untouched
    base_expected, _ = padded_logits(base, batch, tokenizer.pad_token_id)
    assert not torch.allclose(got[real], base_expected[real], atol=1e-3)   # the adapter did change something
    import copy
    generic, _ = padded_logits(pack_linears(copy.deepcopy(base)), batch, tokenizer.pad_token_id)
    assert torch.allclose(generic[real], base_expected[real], atol=1e-4)


def test_sampling_over_the_whole_vocabulary_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.clamp(min=1e-30).log().repeat(2, 1)
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    draws = torch.stack([sample_tokens(logits, torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]), generators,
                                       top_k=0) for _ in range(4000)])
    counts = torch.bincount(draws.flatten(), minlength=5).float() / draws.numel()
    assert counts[4] == 0                                    # a zero-probability token is never drawn
    assert torch.allclose(counts, probs, atol=0.02), counts  # 8000 draws: standard error under 0.006
    again = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    first = sample_tokens(logits, torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]), again, top_k=0)
    assert first.tolist() == draws[0].tolist()               # a row's seed fixes its draws


def test_an_unknown_weights_choice_is_a_config_error():
    with pytest.raises(ConfigError, match="serve.weights: expected one of auto, model, packed, bf16"):
        load_config(None, ["serve.weights=fast"])


def test_the_packed_policy_copy_samples_what_the_peft_policy_samples(tiny_config, tokenizer):
    from peft import LoraConfig, get_peft_model

    from chat_app.packed import policy_copy
    policy = get_peft_model(load_model(tiny_config.model, tokenizer),
                            LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False))
    batch = prompts(tokenizer, "roll", "out a longer prompt here")
    args = dict(max_new_tokens=[10] * 2, temperature=[0.7] * 2, top_p=[1.0] * 2, seeds=[5, 6],
                eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, top_k=0)
    fast = policy_copy(policy)
    assert decode(fast, batch, **args) == decode(policy, batch, **args)
    with policy.disable_adapter():                   # the copy folded the adapter in: it differs from the base
        assert decode(policy, batch, **args) != decode(fast, batch, **args)
        assert decode(policy_copy(policy), batch, **args) == decode(policy, batch, **args)   # a copy made here: base
