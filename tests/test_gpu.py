"""The CUDA path (bf16, engine, PPO step, 4-bit base). Skipped without a GPU; CI has none."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def cuda_config(tiny_config):
    tiny_config.model.device = "cuda"
    return tiny_config


def test_model_loads_in_bf16_and_the_engine_serves_pairs(cuda_config, tokenizer):
    from chat_app.engine import GenerationEngine
    from chat_app.model import load_model

    model = load_model(cuda_config.model, tokenizer)
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).is_cuda
    engine = GenerationEngine(model, tokenizer, max_context_tokens=256).start()
    try:
        result = engine.submit([{"role": "user", "content": "hi"}], n=2, max_new_tokens=8).result()
        assert len(result.texts) == 2
    finally:
        engine.stop()


def test_a_ppo_iteration_runs_on_cuda(cuda_config, tokenizer):
    from chat_app.model import load_model
    from trainer.ppo import ValueHead, make_policy, train_ppo

    cuda_config.ppo.iterations = 1
    policy = make_policy(load_model(cuda_config.model, tokenizer), cuda_config.lora)
    metrics = train_ppo(policy, ValueHead(policy.config.hidden_size), tokenizer,
                        [[{"role": "user", "content": "hello"}]] * 4,
                        lambda prompts, answers: torch.tensor([float(len(a)) for a in answers]), cuda_config.ppo)
    assert torch.isfinite(torch.tensor(metrics["objective/kl"]))


def test_a_4bit_base_loads_through_bitsandbytes(cuda_config, tokenizer):
    pytest.importorskip("bitsandbytes")
    from chat_app.model import load_model

    cuda_config.model.name = "embedded:smollm2"
    cuda_config.model.quantization = "4bit"
    model = load_model(cuda_config.model, tokenizer)
    assert "4bit" in type(model.model.layers[0].mlp.up_proj).__name__.lower() or model.is_loaded_in_4bit
