import pytest
import torch

from chat_app.chat import encode_prompt
from chat_app.decoding import decode
from chat_app.engine import GenerationEngine
from chat_app.model import load_model


@pytest.fixture(params=[("packed", True), ("model", True), ("model", False)], ids=["packed", "merged", "unmerged"])
def engine(request, tiny_config, tokenizer):
    """Every swap path: a packed, a merged or an unmerged-LoRA copy, each built off the engine thread."""
    model = load_model(tiny_config.model, tokenizer)
    weights, merge = request.param
    eng = GenerationEngine(model, tokenizer, max_context_tokens=256, max_batch_requests=8, weights=weights,
                           merge_adapters=merge).start()
    yield eng
    eng.stop()


def ask(text):
    return [{"role": "user", "content": text}]


def test_each_request_gets_two_answers_and_tokens_stream_in_order(engine):
    request = engine.submit(ask("hello"), n=2, max_new_tokens=10, temperature=1.0)
    streamed = {0: "", 1: ""}
    events = list(request.stream())
    for event in events[:-1]:
        assert event[0] == "token"
        streamed[event[1]] += event[2]
    kind, result = events[-1]
    assert kind == "done" and len(result.texts) == 2
    assert [streamed[0], streamed[1]] == result.texts          # the stream adds up to the answers
    assert result.version == "base"
    assert all(0 < n <= 10 for n in result.completion_tokens)


def test_waiting_requests_are_batched_and_each_gets_its_own_answers(tiny_config, tokenizer):
    engine = GenerationEngine(load_model(tiny_config.model, tokenizer), tokenizer, max_context_tokens=256)
    requests = [engine.submit(ask(f"question {i}"), n=2, max_new_tokens=6, seeds=[i, i + 100]) for i in range(4)]
    engine.start()                                           # the four were waiting: one batch
    results = [r.result() for r in requests]
    engine.stop()
    assert engine.batches_run == 1                           # four requests, one prefill
    for i, result in enumerate(results):
        assert result.seeds == [i, i + 100] and len(result.texts) == 2


def test_decode_matches_a_one_by_one_decode(tiny_config, tokenizer):
    model = load_model(tiny_config.model, tokenizer)
    prompts = [encode_prompt(tokenizer, ask(t), 200)[0] for t in ("a", "a much longer question about things")]
    args = dict(temperature=[0.0, 0.0], top_p=[1.0, 1.0], seeds=[0, 0], eos_id=2, pad_id=2)
    together, _ = decode(model, prompts, max_new_tokens=[8, 8], **args)
    alone = [decode(model, [p], max_new_tokens=[8], temperature=[0.0], top_p=[1.0], seeds=[0], eos_id=2,
                    pad_id=2)[0][0] for p in prompts]
    assert together == alone                              # left padding changes nothing


def test_a_long_history_is_cut_oldest_first(tokenizer):
    history = []
    for i in range(30):
        history += [{"role": "user", "content": f"message {i} " + "word " * 20},
                    {"role": "assistant", "content": "answer " * 20}]
    history.append({"role": "user", "content": "the last question"})
    ids, dropped = encode_prompt(tokenizer, history, 300)
    assert len(ids) <= 300 and dropped > 0
    assert "the last question" in tokenizer.decode(ids)
    assert "message 0 " not in tokenizer.decode(ids)


def test_a_swap_waits_for_the_batch_in_flight(engine, tmp_path, tiny_config):
    from peft import LoraConfig, get_peft_model

    adapter = get_peft_model(load_model(tiny_config.model, engine.tokenizer),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "v1")
    before = engine.submit(ask("first"), n=2, max_new_tokens=8)
    pause_ms = engine.swap(str(tmp_path / "v1"), "v1")
    after = engine.submit(ask("second"), n=2, max_new_tokens=8)
    assert before.result().version == "base"
    assert after.result().version == "v1" and pause_ms >= 0
    engine.swap(None, "base")
    assert engine.submit(ask("third"), n=1, max_new_tokens=4).result().version == "base"


def test_after_a_swap_new_requests_do_not_wait_for_a_long_answer_in_flight(engine, tmp_path, tiny_config):
    from peft import LoraConfig, get_peft_model

    adapter = get_peft_model(load_model(tiny_config.model, engine.tokenizer),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "v1")
    greedy = dict(n=1, temperature=0.0)
    long = engine.submit(ask("a long answer"), max_new_tokens=400, ignore_eos=True, **greedy)
    assert long.events.get(timeout=60)[0] == "token"              # decoding on the base
    engine.swap(str(tmp_path / "v1"), "v1")
    late = engine.submit(ask("a short one"), max_new_tokens=4, **greedy).result()
    long_done = any(event[0] == "done" for event in list(long.events.queue))
    assert late.version == "v1" and long.result().version == "base"
    assert not long_done            # separate copies: the old version's rows finish beside the new one
    alone = engine.submit(ask("a long answer"), max_new_tokens=400, ignore_eos=True, **greedy)
    engine.swap(None, "base")
    assert alone.result().version == "v1"


def test_a_bad_adapter_is_refused_and_serving_goes_on(engine, tmp_path):
    with pytest.raises(RuntimeError, match="could not load"):
        engine.swap(str(tmp_path / "missing"), "v9")
    assert engine.version == "base"
    assert engine.submit(ask("still there?"), n=2, max_new_tokens=4).result().version == "base"


def test_bf16_serving_stays_close_to_full_precision_and_swaps_merged_adapters(tiny_config, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    from chat_app.engine import merged_copy
    model = load_model(tiny_config.model, tokenizer)
    ids = torch.tensor([encode_prompt(tokenizer, ask("how close is bf16?"), 100)[0]])
    with torch.no_grad():
        full = torch.log_softmax(model(ids).logits[0, -1], -1)
        low = torch.log_softmax(merged_copy(model)(ids).logits[0, -1].float(), -1)
    kl = float((full.exp() * (full - low)).sum())
    assert kl < 0.01, kl                                      # the same next-token distribution, nearly
    adapter = get_peft_model(load_model(tiny_config.model, tokenizer),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "v1")
    question = [{"role": "user", "content": "merged or not?"}]
    with torch.no_grad():                                     # merging gives the same function as the adapter
        unmerged = adapter(torch.tensor([encode_prompt(tokenizer, question, 100)[0]])).logits[0, -1]
        merged = merged_copy(model, str(tmp_path / "v1"), torch.float32)(
            torch.tensor([encode_prompt(tokenizer, question, 100)[0]])).logits[0, -1]
    assert torch.allclose(unmerged, merged, atol=1e-4)
    engine = GenerationEngine(model, tokenizer, max_context_tokens=256, weights="bf16").start()
    try:
        assert engine.submit(ask("hi"), n=2, max_new_tokens=4).result().version == "base"
        engine.swap(str(tmp_path / "v1"), "v1")
        assert engine.submit(ask("hi"), n=2, max_new_tokens=4).result().version == "v1"
        with pytest.raises(RuntimeError, match="could not load"):
            engine.swap(str(tmp_path / "missing"), "v2")
        assert engine.version == "v1"
    finally:
        engine.stop()


def test_a_new_request_joins_a_running_batch_and_gets_the_same_answer(engine):
    """Continuous batching: a late request streams before the long one ends, and merging changes nothing."""
    greedy = dict(n=1, temperature=0.0)
    alone = engine.submit(ask("a late question"), max_new_tokens=6, **greedy).result().texts[0]
    long = engine.submit(ask("a long answer"), max_new_tokens=60, ignore_eos=True, **greedy)
    assert long.events.get(timeout=60)[0] == "token"             # the long one is decoding
    late = engine.submit(ask("a late question"), max_new_tokens=6, **greedy)
    late_result = late.result()
    assert not any(event[0] == "done" for event in list(long.events.queue))   # joined, not queued behind it
    assert late_result.texts[0] == alone
    assert len(long.result().texts[0]) > 0


@pytest.mark.parametrize("weights", ["model", "packed"])
def test_the_answers_of_a_pair_share_one_prefill_and_each_is_its_own_sample(tiny_config, tokenizer, weights):
    from chat_app.packed import serving_copy
    from chat_app.decoding import DecodeBatch, Row

    model = load_model(tiny_config.model, tokenizer)
    model = serving_copy(model) if weights == "packed" else model
    prompt = encode_prompt(tokenizer, ask("one prompt, two answers"), 200)[0]
    args = dict(temperature=[1.0], top_p=[1.0], eos_id=2, pad_id=2, top_k=0)
    alone = [decode(model, [prompt], max_new_tokens=[10], seeds=[seed], **args)[0][0] for seed in (1, 2)]
    prefilled = []

    class Watched:                                      # the model, noting how many rows each prefill reads
        def parameters(self):
            return model.parameters()

        def __call__(self, **kwargs):
            if kwargs.get("past_key_values") is None:
                prefilled.append(kwargs["input_ids"].shape[0])
            return model(**kwargs)

    batch = DecodeBatch(Watched(), eos_id=2, pad_id=2, top_k=0)
    rows = [Row(key=i, max_new_tokens=10, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(s))
            for i, s in enumerate((1, 2))]
    batch.add([prompt, prompt], rows)
    assert prefilled == [1] and batch.mask.shape[0] == 2  # one prefill row, one cache row per answer
    while len(batch):
        batch.step()
    assert [r.tokens for r in rows] == alone and alone[0] != alone[1]
