"""`run.py bench`: serving and training speed, each figure beside its baseline measured in the same run."""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from chat_app.app import serving_threads
from chat_app.chat import encode_prompt
from chat_app.engine import GenerationEngine, resolve_weights
from chat_app.model import load_model, load_tokenizer

QUESTIONS = ["What is the capital of France?", "Give me three tips for sleeping better.",
             "Explain what a black hole is.", "How do I boil an egg?", "Write a haiku about autumn.",
             "What is photosynthesis?", "Why is the sky blue?", "What does a CPU do?"]


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_generate(model, tokenizer, questions: list[str], new_tokens: int, per_prompt: int = 2) -> dict:
    """Baseline: HF `generate`, sampling, every sequence forced to `new_tokens` (ms per token step)."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(ask(q), add_generation_prompt=True, tokenize=False) for q in questions]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    sync(device)
    started = time.perf_counter()
    model.generate(**batch, do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, num_return_sequences=per_prompt, pad_token_id=tokenizer.pad_token_id)
    sync(device)
    seconds = time.perf_counter() - started
    sequences = len(questions) * per_prompt
    return {"ms_per_step": seconds * 1000 / new_tokens, "tokens_per_s": sequences * new_tokens / seconds}


def engine_pairs(engine: GenerationEngine, questions: list[str], new_tokens: int, together: bool,
                 versions=None) -> dict:
    """Pairs through the engine: all submitted at once (batched), or one request after another. `versions(i)`: the
    two versions of the i-th pair (a canary trial's), or None for the served one."""
    started = time.perf_counter()
    if together:
        results = [job.result() for job in [engine.submit(ask(q), n=2, max_new_tokens=new_tokens, ignore_eos=True,
                                                          versions=versions(i) if versions else None)
                                            for i, q in enumerate(questions)]]
    else:
        results = [engine.submit(ask(q), n=2, max_new_tokens=new_tokens, ignore_eos=True).result()
                   for q in questions]
    seconds = time.perf_counter() - started
    tokens = sum(sum(r.completion_tokens) for r in results)
    steps = new_tokens if together else new_tokens * len(questions)
    return {"ms_per_step": seconds * 1000 / steps, "tokens_per_s": tokens / seconds,
            "first_token_ms": statistics.median(r.first_token_ms for r in results)}


@torch.no_grad()
def precision_quality(model, tokenizer, questions: list[str], new_tokens: int, weights: str) -> dict:
    """How much the serving copy changes the model: per-token KL(loaded || copy) and argmax agreement on sampled
    answers."""
    from chat_app.decoding import decode
    from chat_app.engine import serving_model

    quantized = serving_model(model, weights)
    prompts = [encode_prompt(tokenizer, ask(q), 512)[0] for q in questions]
    answers, _ = decode(model, prompts, max_new_tokens=[new_tokens] * len(prompts), temperature=[0.7] * len(prompts),
                        top_p=[0.9] * len(prompts), seeds=list(range(len(prompts))), eos_id=tokenizer.eos_token_id,
                        pad_id=tokenizer.pad_token_id)
    kls, agree, total = [], 0, 0
    for prompt, answer in zip(prompts, answers):
        ids = torch.tensor([prompt + answer])
        full = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].float(), -1)
        low = torch.log_softmax(quantized(ids).logits[0, len(prompt) - 1:-1].float(), -1)
        kls.append((full.exp() * (full - low)).sum(-1))
        agree += int((full.argmax(-1) == low.argmax(-1)).sum())
        total += len(answer)
    return {"kl_per_token": float(torch.cat(kls).mean()), "argmax_agreement": agree / max(total, 1)}


def random_adapter(model_cfg, tokenizer, lora_cfg, folder: Path) -> Path:
    """A LoRA adapter of the configured shape with random (non-zero) weights: the cost of serving one."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(load_model(model_cfg, tokenizer), LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.alpha, target_modules=lora_cfg.target_modules, init_lora_weights=False))
    peft_model.save_pretrained(folder)
    return folder


def training_load(seconds: float, config_path: str, threads: int | None, borrow: bool = False):
    """Start a subprocess that trains (forward + backward, like PPO's update) for `seconds`; with `borrow`, it takes
    this process's core too whenever this process is idle, looking before each step as the trainer does."""
    env = {**os.environ}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pace = (f"from trainer.threads import CoreBorrower; pace = CoreBorrower({os.getpid()}, {threads or 1}, "
            f"{os.cpu_count() or 1})\n" if borrow else "pace = lambda: None\n")
    code = ("import sys, time, torch; from chat_app.config import load_config; "
            "from chat_app.model import load_model, load_tokenizer; "
            f"c = load_config({config_path!r}); t = load_tokenizer(c.model); m = load_model(c.model, t); m.train(); "
            "ids = torch.randint(100, 1000, (8, 96)); print('ready', flush=True); end = time.time() + float(sys.argv[1])\n"
            + pace + "while time.time() < end: pace(); m(input_ids=ids, labels=ids).loss.backward()")
    process = subprocess.Popen([sys.executable, "-c", code, str(seconds)], env=env, stdout=subprocess.PIPE, text=True)
    process.stdout.readline()   # wait until it is loaded and about to train
    return process


def hot_swap_under_load(engine: GenerationEngine, adapter: Path, version: str, new_tokens: int) -> dict:
    """Swap while requests keep arriving: serving's pause, and how many requests finished during the swap."""
    finished: list[float] = []
    failed: list[str] = []
    stop = threading.Event()

    def users():
        while not stop.is_set():
            try:
                engine.submit(ask("Say something."), n=2, max_new_tokens=new_tokens).result()
                finished.append(time.perf_counter())
            except Exception as error:   # counted, not raised: the figure is how many failed
                failed.append(str(error))

    workers = [threading.Thread(target=users, daemon=True) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    started = time.perf_counter()
    pause_ms = engine.swap(str(adapter), version)
    ended = time.perf_counter()
    time.sleep(1.0)
    stop.set()
    for w in workers:
        w.join()
    during = sum(started <= t <= ended for t in finished)
    return {"pause_ms": pause_ms, "swap_call_ms": (ended - started) * 1000, "requests_finished_during_swap": during,
            "requests_failed": len(failed)}


def bench_training(config, tokenizer, ppo_batch: int, response_length: int, iterations: int) -> dict:
    """Reward-model pairs/s and PPO iteration time split into rollout and update."""
    import dataclasses

    from trainer.data import as_messages, load_prompts
    from trainer.ppo import ValueHead, make_policy, train_ppo
    from trainer.reward import train_reward_model

    prompts = load_prompts(config.schedule.seed_prompts)
    reward_cfg = dataclasses.replace(config.reward, epochs=1)
    _, rm_metrics = train_reward_model(config.model, reward_cfg, tokenizer, synthetic_pairs(prompts, 48))
    policy = make_policy(load_model(config.model, tokenizer), config.lora)
    value_head = ValueHead(policy.config.hidden_size)
    cfg = config.ppo
    cfg.iterations, cfg.response_length = iterations, response_length
    cfg.samples_per_prompt = 2
    cfg.rollout_prompts = max(1, ppo_batch // cfg.samples_per_prompt)
    reward_fn = lambda prompts, answers: torch.tensor([-len(a) / 100 for a in answers])   # noqa: E731
    metrics = train_ppo(policy, value_head, tokenizer, [as_messages(p) for p in prompts], reward_fn, cfg)
    borrowed = {}
    own, cores = torch.get_num_threads(), os.cpu_count() or 1
    idle = config.schedule.trainer_idle_threads or cores
    if next(policy.parameters()).device.type == "cpu" and idle > own:   # the server's core too, while it is idle
        torch.set_num_threads(idle)
        idle_metrics = train_ppo(policy, value_head, tokenizer, [as_messages(p) for p in prompts], reward_fn, cfg)
        torch.set_num_threads(own)
        borrowed = {"ppo_iteration_idle_server_s": (idle_metrics["time/rollout_s"] + idle_metrics["time/update_s"])
                    / iterations, "idle_server_threads": idle}
    # the rollout's generation alone, through the packed copy (what train_ppo used on CPU) and through the HF model
    from chat_app.packed import policy_copy
    from trainer.ppo import rollout

    rollout_prompts = [encode_prompt(tokenizer, as_messages(p), 512)[0] for p in prompts[:ppo_batch]]
    generation = {}
    for fast in (True, False) if policy_copy(policy) is not None else (False,):   # no packed copy of a 4-bit base
        cfg.fast_rollouts = fast
        started = time.perf_counter()
        rollout(policy, tokenizer, rollout_prompts, cfg, seed=0)
        generation["packed" if fast else "hf_model"] = time.perf_counter() - started
    cfg.fast_rollouts = True
    return {"rollout_generation_s": generation,
            "rm_pairs_per_s": rm_metrics.get("rm/pairs_per_s"),
            "ppo_iteration_s": (metrics["time/rollout_s"] + metrics["time/update_s"]) / iterations,
            "ppo_rollout_s": metrics["time/rollout_s"] / iterations,
            "ppo_update_s": metrics["time/update_s"] / iterations,
            "ppo_batch": cfg.rollout_prompts * cfg.samples_per_prompt, "response_length": response_length,
            **borrowed}


def synthetic_pairs(prompts: list[str], n: int, seed: int = 0) -> list[dict]:
    """`n` preference pairs of realistic lengths (a short answer preferred to a rambling one), ids 0..n-1."""
    import random

    from trainer.data import as_messages

    rng = random.Random(seed)
    return [{"comparison_id": i, "prompt_messages": as_messages(f"{prompts[i % len(prompts)]} ({i // len(prompts)})"),
             "chosen": "A short, clear answer" + " with a detail" * rng.randint(0, 6) + ".",
             "rejected": "A long answer that rambles on " + "and on " * rng.randint(5, 40)} for i in range(n)]


def bench_reward_scaling(config, tokenizer, sizes: list[int], new_votes: int) -> list[dict]:
    """The reward model's cost as votes grow: trained cold on n votes, then warm-started with `new_votes` more."""
    import dataclasses

    from trainer.data import load_prompts
    from trainer.reward import train_reward_model

    prompts = load_prompts(config.schedule.seed_prompts)
    reward_cfg = dataclasses.replace(config.reward, epochs=1)
    rows = []
    for n in sizes:
        pairs = synthetic_pairs(prompts, n + new_votes)
        with tempfile.TemporaryDirectory() as tmp:
            cold, cold_metrics = train_reward_model(config.model, reward_cfg, tokenizer, pairs[:n])
            cold.save(Path(tmp) / "rm")
            del cold
            _, warm_metrics = train_reward_model(config.model, reward_cfg, tokenizer, pairs,
                                                 init_adapter=str(Path(tmp) / "rm"))
        rows.append({"votes": n, "cold": _rm_cost(cold_metrics), "warm_votes": n + new_votes,
                     "warm": _rm_cost(warm_metrics)})
    return rows


def _rm_cost(metrics: dict) -> dict:
    keys = ("time/reward_s", "time/reward_encode_s", "time/reward_train_s", "rm/train_pairs", "rm/new_pairs",
            "rm/replayed_pairs", "rm/tokenized_pairs", "rm/heldout_pairs")
    return {key.split("/")[1]: metrics[key] for key in keys}


def bench(config, as_json: bool = False, ppo_batch: int = 8, response_length: int = 48, iterations: int = 2,
          new_tokens: int = 48, rm_sizes: list[int] = (), rm_new_votes: int = 32) -> dict:
    results: dict = {"config": config.source, "cores": os.cpu_count(), "torch": torch.__version__}
    torch.set_num_threads(serving_threads(config, training=False))
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, tokenizer)
    device = next(model.parameters()).device
    results["device"] = str(device)
    say = (lambda *a: None) if as_json else (lambda *a: print(*a, flush=True))
    from chat_app.app import engine_merges, engine_weights

    weights = resolve_weights(engine_weights(config), model)
    results["engine_weights"] = weights
    results["quantization"] = config.model.quantization
    results["model_memory_mb"] = model.get_memory_footprint() / 2**20
    say(f"model: {config.model.name}, {config.model.quantization if config.model.quantization != 'none' else 'no'} "
        f"quantization, {results['model_memory_mb']:.0f} MB of weights on {device}; serving through {weights}")
    engine = GenerationEngine(model, tokenizer, max_context_tokens=config.model.max_context_tokens,
                              max_batch_requests=8, weights=weights, merge_adapters=engine_merges(config)).start()
    engine_pairs(engine, QUESTIONS[:1], 4, together=True)        # warm-up
    plain_generate(model, tokenizer, QUESTIONS[:1], 4)

    # 1. one pair, and eight users at once, against plain generate
    one_plain = plain_generate(model, tokenizer, QUESTIONS[:1], new_tokens)
    one = engine_pairs(engine, QUESTIONS[:1], new_tokens, together=True)
    results["one_pair"] = {**one, "plain_generate_ms_per_step": one_plain["ms_per_step"],
                           "ratio_to_plain": one["ms_per_step"] / one_plain["ms_per_step"]}
    say(f"one pair ({weights} engine): {one['ms_per_step']:.1f} ms/step vs plain generate {one_plain['ms_per_step']:.1f} "
        f"({results['one_pair']['ratio_to_plain']:.2f}x the time per step), first token {one['first_token_ms']:.0f} ms")
    eight_plain = plain_generate(model, tokenizer, QUESTIONS, new_tokens)
    eight = engine_pairs(engine, QUESTIONS, new_tokens, together=True)
    one_at_a_time = engine_pairs(engine, QUESTIONS, new_tokens, together=False)
    results["eight_users"] = {**eight, "one_at_a_time_tokens_per_s": one_at_a_time["tokens_per_s"],
                              "throughput_vs_one_at_a_time": eight["tokens_per_s"] / one_at_a_time["tokens_per_s"],
                              "plain_generate_tokens_per_s": eight_plain["tokens_per_s"]}
    say(f"8 users: {eight['tokens_per_s']:.0f} tok/s vs one at a time {one_at_a_time['tokens_per_s']:.0f} "
        f"({results['eight_users']['throughput_vs_one_at_a_time']:.2f}x the throughput); plain generate of 16 sequences "
        f"{eight_plain['tokens_per_s']:.0f} tok/s; first token (median) {eight['first_token_ms']:.0f} ms")

    # 2. serving a LoRA adapter (the normal state after the first retrain), and the hot-swap to it
    with tempfile.TemporaryDirectory() as tmp:
        adapter = random_adapter(config.model, tokenizer, config.lora, Path(tmp) / "v1")
        results["hot_swap"] = hot_swap_under_load(engine, adapter, "v1", new_tokens=16)
        swap = results["hot_swap"]
        say(f"hot-swap: the engine paused {swap['pause_ms']:.2f} ms; the swap call took {swap['swap_call_ms']:.0f} ms "
            f"(loading the adapter, and building the copy that serves it), {swap['requests_finished_during_swap']} requests finished meanwhile, "
            f"{swap['requests_failed']} failed")
        lora_one = engine_pairs(engine, QUESTIONS[:1], new_tokens, together=True)
        lora_eight = engine_pairs(engine, QUESTIONS, new_tokens, together=True)
        results["with_lora"] = {"one_pair_ms_per_step": lora_one["ms_per_step"],
                                "eight_users_tokens_per_s": lora_eight["tokens_per_s"],
                                "ratio_to_base": lora_one["ms_per_step"] / one["ms_per_step"]}
        say(f"with a LoRA adapter: one pair {lora_one['ms_per_step']:.1f} ms/step "
            f"({results['with_lora']['ratio_to_base']:.2f}x the base), 8 users {lora_eight['tokens_per_s']:.0f} tok/s")

        # 2b. a canary trial: the base beside v1 in the same steps; rows grouped by version (one forward each) over
        # merged copies, one batch with an adapter per row over unmerged LoRA (engine.mixes_adapters)
        engine.set_second(None, "base")
        trial = lambda i: ["v1", "base"]                                       # every pair a trial pair
        quarter = lambda i: ["v1", "base"] if i % 4 == 0 else None              # canary.share's default
        mixed_one = engine_pairs(engine, QUESTIONS[:1], new_tokens, together=True, versions=trial)
        mixed_eight = engine_pairs(engine, QUESTIONS, new_tokens, together=True, versions=trial)
        quarter_eight = engine_pairs(engine, QUESTIONS, new_tokens, together=True, versions=quarter)
        engine.set_second(None, None)
        results["mixed_versions"] = {
            "one_forward_per_step": engine.mixes_adapters,
            "one_pair_ms_per_step": mixed_one["ms_per_step"],
            "one_pair_ratio_to_single_version": mixed_one["ms_per_step"] / lora_one["ms_per_step"],
            "eight_users_tokens_per_s": mixed_eight["tokens_per_s"],
            "eight_users_ratio_to_single_version": mixed_eight["tokens_per_s"] / lora_eight["tokens_per_s"],
            "quarter_trial_tokens_per_s": quarter_eight["tokens_per_s"],
            "quarter_trial_ratio_to_single_version": quarter_eight["tokens_per_s"] / lora_eight["tokens_per_s"]}
        mixed = results["mixed_versions"]
        say(f"two versions in one step (canary trial, {'one batch' if engine.mixes_adapters else 'a batch each'}): "
            f"one pair {mixed['one_pair_ms_per_step']:.1f} ms/step "
            f"({mixed['one_pair_ratio_to_single_version']:.2f}x one version); 8 users all in the trial "
            f"{mixed['eight_users_tokens_per_s']:.0f} tok/s ({mixed['eight_users_ratio_to_single_version']:.2f}x the "
            f"throughput of one version), a quarter in it {mixed['quarter_trial_tokens_per_s']:.0f} tok/s "
            f"({mixed['quarter_trial_ratio_to_single_version']:.2f}x)")

    # 3. while a training process runs beside serving: our thread split against torch's defaults
    if device.type == "cpu":
        split = {}
        for name, serve_threads, train_threads, borrow in (
                ("split", serving_threads(config, training=True), config.schedule.trainer_threads, False),
                ("split_borrowing", serving_threads(config, training=True), config.schedule.trainer_threads, True),
                ("default_threads", os.cpu_count(), None, False)):
            engine.threads = serve_threads
            load = training_load(60, config.source or "configs/default.yaml", train_threads, borrow)
            time.sleep(1.0 if borrow else 0)                    # idle: the trainer has taken our core
            during = engine_pairs(engine, QUESTIONS[:1], 24, together=True)
            load.kill()
            load.wait()
            split[name] = {"serving_threads": serve_threads, "trainer_threads": train_threads or os.cpu_count(),
                           "one_pair_ms_per_step": during["ms_per_step"]}
        engine.threads = serving_threads(config, training=False)
        results["during_training"] = split
        say(f"while training: one pair {split['split']['one_pair_ms_per_step']:.0f} ms/step with our split "
            f"({split['split']['serving_threads']}+{split['split']['trainer_threads']} threads), "
            f"{split['split_borrowing']['one_pair_ms_per_step']:.0f} ms/step when the trainer borrows the idle "
            f"server's core (it gives it back once serving starts) vs "
            f"{split['default_threads']['one_pair_ms_per_step']:.0f} ms/step with default threads")
    engine.stop()
    serving_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # before the comparison copies

    if weights != "model":   # the same decode loop on the weights as loaded, to separate the two gains
        loaded = GenerationEngine(model, tokenizer, max_context_tokens=config.model.max_context_tokens,
                                  weights="model").start()
        engine_pairs(loaded, QUESTIONS[:1], 4, together=True)
        results["loaded_weights_engine"] = {
            "one_pair_ms_per_step": engine_pairs(loaded, QUESTIONS[:1], new_tokens, together=True)["ms_per_step"],
            "eight_users_tokens_per_s": engine_pairs(loaded, QUESTIONS, new_tokens, together=True)["tokens_per_s"]}
        loaded.stop()
        results["serving_copy_quality"] = precision_quality(model, tokenizer, QUESTIONS, new_tokens, weights)
        say(f"engine on the weights as loaded: one pair {results['loaded_weights_engine']['one_pair_ms_per_step']:.1f}"
            f" ms/step, 8 users {results['loaded_weights_engine']['eight_users_tokens_per_s']:.0f} tok/s; {weights} "
            f"copy vs loaded: KL {results['serving_copy_quality']['kl_per_token']:.1e} nats/token, argmax agreement "
            f"{results['serving_copy_quality']['argmax_agreement']:.3f}")

    # 4. training speed (in this process), then peak memory
    torch.set_num_threads(config.schedule.trainer_threads if device.type == "cpu" else torch.get_num_threads())
    results["training"] = bench_training(config, tokenizer, ppo_batch, response_length, iterations)
    say(f"training: reward model {results['training']['rm_pairs_per_s']:.1f} pairs/s (48 synthetic votes, 1 epoch); "
        f"PPO iteration "
        f"{results['training']['ppo_iteration_s']:.1f} s (rollout {results['training']['ppo_rollout_s']:.1f} s, "
        f"update {results['training']['ppo_update_s']:.1f} s) at batch {results['training']['ppo_batch']} x "
        f"{response_length} tokens; rollout generation " + " vs ".join(
            f"{seconds:.1f} s {'packed' if name == 'packed' else 'through the HF model'}"
            for name, seconds in results['training']['rollout_generation_s'].items()))
    if "ppo_iteration_idle_server_s" in results["training"]:
        say(f"PPO iteration with the idle server's core too ({results['training']['idle_server_threads']} threads, "
            f"schedule.trainer_idle_threads): {results['training']['ppo_iteration_idle_server_s']:.1f} s")
    if rm_sizes:   # 5. how a retrain's cost grows with the votes (PPO and the gate do not depend on them)
        results["reward_scaling"] = bench_reward_scaling(config, tokenizer, rm_sizes, rm_new_votes)
        for row in results["reward_scaling"]:
            say(f"reward model (1 epoch) on {row['votes']} votes cold: {row['cold']['reward_s']:.1f} s "
                f"({row['cold']['train_pairs']} pairs trained, {row['cold']['tokenized_pairs']} tokenised); "
                f"warm-started at {row['warm_votes']}: {row['warm']['reward_s']:.1f} s ({row['warm']['new_pairs']} "
                f"new + {row['warm']['replayed_pairs']} replayed, {row['warm']['tokenized_pairs']} tokenised)")
    results["peak_memory_mb"] = {"serving": serving_peak_mb,
                                 "serving_then_training": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        results["peak_memory_mb"]["cuda"] = torch.cuda.max_memory_allocated() / 2**20
    say("peak memory (resident): " + ", ".join(f"{name.replace('_', ' ')} {mb / 1024:.1f} GB"
                                              for name, mb in results["peak_memory_mb"].items()))
    if as_json:
        print(json.dumps(results, indent=2))
    return results
