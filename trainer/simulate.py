"""`run.py simulate`: simulated users chat, vote through the same store (or a running server's API), retrain."""
from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

from trainer.data import as_messages, load_prompts
from trainer.oracles import load_oracle


def collect_votes(store, engine, judge, prompts: list[str], votes: int, sampling: dict, voter: str,
                  batch: int = 8, seed: int = 0, candidates: int = 2, picker=None) -> dict:
    """Sample `votes` pairs through the engine, let the judge vote, store everything as simulated. With
    `candidates` > 2 and a `picker`, the pair voted on is the one the reward model is least sure of."""
    from chat_app.chat import cast_vote, finish_pair, start_pair

    rng = random.Random(seed)
    tally = {"a": 0, "b": 0, "tie": 0}
    done = 0
    while done < votes:
        wave = []
        for _ in range(min(batch, votes - done)):
            prompt = rng.choice(prompts)
            cid, job = start_pair(store, engine, as_messages(prompt), source="simulated",
                                  candidates=candidates if picker else 2, **sampling)
            wave.append((prompt, cid, job))
        for prompt, cid, job in wave:
            result = job.result()
            i, j = finish_pair(store, cid, result, picker)
            choice = judge(prompt, result.texts[i], result.texts[j])
            status, message = cast_vote(store, cid, choice, voter=voter)
            if status != "ok":
                raise RuntimeError(message)
            tally[choice] += 1
        done += len(wave)
        print(f"  votes {done}/{votes}  a={tally['a']} b={tally['b']} tie={tally['tie']}", flush=True)
    return tally


def simulate(config, *, oracle: str, prompts_file: str | None, votes: int, cycles: int, server: str | None = None,
             retrain_after: bool = True):
    judge = load_oracle(oracle)
    prompts = load_prompts(prompts_file or config.schedule.seed_prompts)
    if server:
        return simulate_over_http(server, judge, prompts, votes, cycles, oracle, config)
    from chat_app.app import engine_weights
    from chat_app.engine import GenerationEngine
    from chat_app.model import load_model, load_tokenizer
    from chat_app.store import Store
    from trainer.pipeline import retrain

    store = Store(config.serve.db_path)
    tokenizer = load_tokenizer(config.model)
    engine = GenerationEngine(load_model(config.model, tokenizer), tokenizer,
                              max_context_tokens=config.model.max_context_tokens,
                              max_batch_requests=config.serve.max_batch_requests,
                              weights=engine_weights(config)).start()
    serving = store.serving_version()
    if serving:
        engine.swap(serving["adapter_path"], serving["id"])
    sampling = {"max_new_tokens": config.serve.max_new_tokens, "temperature": config.serve.temperature,
                "top_p": config.serve.top_p}
    summaries = []
    for cycle in range(1, cycles + 1):
        picker = None
        # the newest reward model, served or not: it was fitted on every vote so far, whatever the gate said
        trained = [v for v in store.versions() if v.get("reward_adapter_path")]
        if config.serve.candidates > 2 and trained:   # a reward model exists: ask where it is unsure
            from trainer.reward_heads import PairPicker

            picker = PairPicker.from_folder(engine.base_model, tokenizer, trained[-1]["reward_adapter_path"])
        print(f"cycle {cycle}/{cycles}: {votes} simulated votes by {oracle} on {engine.version}"
              + (f", the most uncertain pair of {config.serve.candidates} answers" if picker else ""), flush=True)
        t0 = time.perf_counter()
        tally = collect_votes(store, engine, judge, prompts, votes, sampling, voter=f"oracle:{oracle}",
                              batch=config.serve.max_batch_requests, seed=cycle, candidates=config.serve.candidates,
                              picker=picker)
        vote_s = time.perf_counter() - t0
        if not retrain_after:                                   # votes only: arms of `retrain` on copies of the db
            line = {"cycle": cycle, "votes": tally, "time/votes_s": round(vote_s, 1), "serving": engine.version}
            print(json.dumps(line), flush=True)
            summaries.append(line)
            continue
        summary = retrain(config, promote=True)
        if summary.get("promoted"):
            engine.swap(str(config.serve.adapters_dir) + "/" + summary["version"], summary["version"])
        keys = ["status", "version", "reason", "rm/accuracy", "rm/heldout_pairs", "rm/cv_accuracy", "rm/ece",
                "objective/score", "objective/kl", "eval/reward_gain_std", "eval/reward_gain_lc",
                "eval/reward_gain", "eval/candidate_kl", "eval/candidate_length", "eval/serving_length", "eval/length_ratio",
                "time/reward_s", "time/ppo_s", "time/gate_s", "time/total_s", "ppo/iterations"]
        line = {"cycle": cycle, "votes": tally, "time/votes_s": round(vote_s, 1), "serving": engine.version,
                **{k: summary.get(k) for k in keys if k in summary}}
        print(json.dumps(line), flush=True)
        summaries.append(line)
    engine.stop()
    return summaries


def vote_through_trial(client, safe_vote, concurrency: int, wait_s: float) -> None:
    """While the server runs a canary trial (chat_app/canary.py), keep voting until the votes decide it; print its
    figures as they go and the decision with the votes it took. Nothing to do without a trial."""
    status = client.get("/api/status").json()
    trial = (status.get("canary") or {}).get("trial")
    if not trial:
        return
    started, deadline, cast = time.time(), time.time() + wait_s, 0
    print(f"  trial: {trial['candidate']} against {trial['incumbent']} ({trial['phase']}) on "
          f"{100 * status['canary']['share']:.0f}% of comparisons; voting until the votes decide", flush=True)
    while time.time() < deadline:
        with ThreadPoolExecutor(concurrency) as pool:
            cast += sum(r is not None for r in pool.map(safe_vote, range(concurrency)))
        status = client.get("/api/status").json()
        now = status["canary"]["trial"]
        if not now or (now["candidate"], now["phase"]) != (trial["candidate"], trial["phase"]):
            decision = status["canary"]["last_decision"]
            print(json.dumps({"trial": f"{trial['candidate']} vs {trial['incumbent']}", "phase": trial["phase"],
                              "decision": decision, "votes_cast": cast, "minutes": round((time.time() - started) / 60, 1),
                              "serving_version": status["serving_version"],
                              "leaderboard": status.get("leaderboard")}), flush=True)
            if now:   # promoted: the watch against its parent goes on
                trial, started, cast = now, time.time(), 0
                print(f"  trial: {trial['candidate']} watched against {trial['incumbent']}", flush=True)
                continue
            return
        f = now.get("figures") or {}
        print(f"  {time.strftime('%H:%M:%S')} {now['candidate']} vs {now['incumbent']} ({now['phase']}): "
              f"{f.get('comparisons', 0)} trial votes, win rate {f.get('win_rate') or 0:.2f} "
              f"{f.get('win_rate_interval') or ''}; the votes say {now['next_decision']}", flush=True)


def simulate_over_http(server: str, judge, prompts: list[str], votes: int, cycles: int, oracle: str, config,
                       concurrency: int = 8, wait_s: float = 3600):
    """Vote through a running app's API; its scheduler retrains. Waits for the run after each round."""
    import httpx

    client = httpx.Client(base_url=server.rstrip("/"), timeout=600)
    rng = random.Random(0)

    def post(path: str, body: dict, user: int):
        """Each simulated user is a client of its own to the server's limits (config `limits`): its own API key.
        A 429 or 503 (busy) is retried after the Retry-After the server sends, as a polite client would."""
        for attempt in range(3):
            reply = client.post(path, json=body, headers={"Authorization": f"Bearer sim-user-{user}"})
            if reply.status_code not in (429, 503) or attempt == 2:
                break
            time.sleep(float(reply.headers.get("Retry-After", 5)))
        reply.raise_for_status()
        return reply

    def one_vote(i):
        prompt = rng.choice(prompts)
        started = time.perf_counter()
        body = post("/v1/chat/completions", {"messages": as_messages(prompt), "n": 2}, user=i % concurrency).json()
        answers = [c["message"]["content"] for c in body["choices"]]
        choice = judge(prompt, answers[0], answers[1])
        post("/v1/feedback", {"comparison_id": body["id"], "choice": choice, "voter": f"oracle:{oracle}"},
             user=i % concurrency)
        return body["model"], choice, (time.perf_counter() - started) * 1000

    failures: list[str] = []

    def safe_vote(i):
        try:
            return one_vote(i)
        except Exception as error:  # counted and reported: the point is that none happen
            failures.append(f"{type(error).__name__}: {error}")
            return None

    for cycle in range(1, cycles + 1):
        before = client.get("/api/status").json()
        t0 = time.perf_counter()
        results = []
        print(f"cycle {cycle}/{cycles}: {votes} votes by {oracle} through {server}, {concurrency} users at a time",
              flush=True)
        with ThreadPoolExecutor(concurrency) as pool:
            for done, result in enumerate(pool.map(safe_vote, range(votes)), 1):
                if result:
                    results.append(result)
                if done % concurrency == 0 or done == votes:    # a line per round of users: it is not hung
                    print(f"  {time.strftime('%H:%M:%S')} votes {done}/{votes}, served by "
                          f"{', '.join(sorted({r[0] for r in results})) or '-'}, {len(failures)} failed", flush=True)
        versions = sorted({r[0] for r in results})
        latencies = sorted(r[2] for r in results) or [0]
        print(json.dumps({"cycle": cycle, "votes": len(results), "failed": len(failures), "served_by": versions,
                          "median_request_ms": round(latencies[len(latencies) // 2]),
                          "time/votes_s": round(time.perf_counter() - t0, 1)}), flush=True)
        vote_through_trial(client, safe_vote, concurrency, wait_s)
        deadline, during = time.time() + wait_s, []
        while time.time() < deadline:   # the server's scheduler decides when to train; keep chatting meanwhile
            status = client.get("/api/status").json()
            if not status.get("training") and not status.get("schedule", {}).get("enabled", True):
                print("  the server's schedule is paused: not waiting for a training run", flush=True)
                break
            last, previous = status.get("last_run"), before.get("last_run")
            if last and (not previous or last["id"] > previous["id"]) and status["training"] is None:
                break
            reply = safe_vote(len(during))   # users take turns: no one user's minute fills up
            if reply:
                during.append(reply)
            training = status["training"] or {}
            progress = training.get("progress", {})
            print(f"  {time.strftime('%H:%M:%S')} serving {status['serving_version']}, run "
                  f"{training.get('run_id', '-')} {progress.get('stage', 'waiting')} {progress.get('step', '')}/"
                  f"{progress.get('steps', '')}, request {round(reply[2]) if reply else 'FAILED'} ms", flush=True)
            time.sleep(2)
        during_ms = sorted(r[2] for r in during) or [0]
        print(json.dumps({"cycle": cycle, "serving_version": status["serving_version"], "last_run": status["last_run"],
                          "serving": status["serving"], "requests_while_training": len(during),
                          "median_ms_while_training": round(during_ms[len(during_ms) // 2]),
                          "failed": len(failures)}), flush=True)
        vote_through_trial(client, safe_vote, concurrency, wait_s)   # a version that passed the gate: a canary
    if failures:
        print("failures:", *failures[:10], sep="\n  ")
