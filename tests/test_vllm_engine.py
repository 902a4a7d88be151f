"""serve.engine=vllm (chat_app/vllm_engine.py): the app against a fake vLLM server, and against a real one when
RLHF_TEST_VLLM_URL names it (slow)."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from conftest import free_port, in_process_app

HI = [{"role": "user", "content": "hi"}]
BASE = "fake-base"
AUTH = {"Authorization": "Bearer pw"}


# -- a fake vLLM server: the endpoints the engine uses, deterministic answers, every call recorded -------------
def fake_answer(model: str, seed) -> list[str]:
    """The words a model name answers with: who answered and the seed it was given."""
    return [f"{model} ", "says ", f"{seed}."]


class FakeVLLM:
    def __init__(self, chunk_delay_s: float = 0.0):
        self.calls: list[tuple[str, dict]] = []
        self.loras: dict[str, str] = {}
        api = FastAPI()

        @api.get("/v1/models")
        async def models():
            data = [{"id": BASE, "object": "model", "root": BASE, "parent": None}]
            data += [{"id": name, "object": "model", "root": path, "parent": BASE} for name, path in self.loras.items()]
            return {"object": "list", "data": data}

        @api.post("/v1/load_lora_adapter")
        async def load(request: Request):
            body = await request.json()
            self.calls.append(("load", body))
            if body["lora_name"] in self.loras:
                return PlainTextResponse(f"The lora adapter '{body['lora_name']}' has already been loaded.", 400)
            if not os.path.isdir(body["lora_path"]):
                return PlainTextResponse(f"no adapter at {body['lora_path']}", 404)
            self.loras[body["lora_name"]] = body["lora_path"]
            return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

        @api.post("/v1/unload_lora_adapter")
        async def unload(request: Request):
            body = await request.json()
            self.calls.append(("unload", body))
            if self.loras.pop(body["lora_name"], None) is None:
                return PlainTextResponse(f"The lora adapter '{body['lora_name']}' cannot be found.", 404)
            return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")

        @api.post("/v1/chat/completions")
        async def completions(request: Request):
            import asyncio

            body = await request.json()
            self.calls.append(("chat", body))
            model = body["model"]
            if model != BASE and model not in self.loras:
                return JSONResponse({"error": {"message": f"The model `{model}` does not exist."}}, 404)
            seed, n = body.get("seed"), body.get("n", 1)
            answers = [fake_answer(model, None if seed is None else seed + i)[:body["max_tokens"]] for i in range(n)]
            reasons = ["stop" if len(a) == 3 else "length" for a in answers]
            usage = {"prompt_tokens": 7, "completion_tokens": sum(map(len, answers)),
                     "total_tokens": 7 + sum(map(len, answers))}
            if not body.get("stream"):
                return {"model": model, "usage": usage, "choices": [
                    {"index": i, "message": {"role": "assistant", "content": "".join(a)}, "finish_reason": r}
                    for i, (a, r) in enumerate(zip(answers, reasons))]}

            async def events():
                def chunk(choices, **extra):
                    return f"data: {json.dumps({'model': model, 'choices': choices, **extra})}\n\n"

                for i in range(n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                for step in range(3):
                    for i, words in enumerate(answers):
                        if step < len(words):
                            await asyncio.sleep(chunk_delay_s)
                            last = step == len(words) - 1
                            yield chunk([{"index": i, "delta": {"content": words[step]},
                                          "finish_reason": reasons[i] if last else None}])
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield chunk([], usage=usage)
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        import uvicorn

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the fake vLLM server did not start"
            time.sleep(0.02)

    def chats(self) -> list[dict]:
        return [body for kind, body in self.calls if kind == "chat"]

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def fake_vllm():
    server = FakeVLLM()
    yield server
    server.close()


@pytest.fixture
def vllm_app(fake_vllm, tmp_path, monkeypatch):
    """The tiny app (API only, in process) serving through the fake vLLM server; returns (app, client, fake)."""
    monkeypatch.setenv("OPERATOR_PASSWORD", "pw")
    app, client = in_process_app(tmp_path, ["serve.engine=vllm", f"serve.vllm_url={fake_vllm.url}",
                                            "canary.share=1.0", "limits.votes_per_minute=0",
                                            "limits.requests_per_minute=0"])
    yield app, client, fake_vllm
    app.close()


def eventually(condition, timeout_s: float = 10) -> bool:
    """Whether `condition()` holds within `timeout_s` (the engine unloads just after it hands back a result)."""
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.01)
    return True


def adapter_folder(tmp_path, version: str = "v1") -> str:
    """A folder standing for a version's saved adapter (the fake server only checks that it exists)."""
    folder = tmp_path / "adapters" / version
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    return str(folder)


def stream_pair(client, content: str = "hi") -> tuple[list[str], dict]:
    """An n=2 streamed completion through the app: (the two texts, the last chunk)."""
    texts, last = ["", ""], None
    with client.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                             "n": 2, "stream": True, "max_tokens": 8}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                texts[choice["index"]] += choice["delta"].get("content") or ""
            last = chunk
    return texts, last


def pair(client, content: str = "hi") -> dict:
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                         "n": 2, "max_tokens": 8})
    assert response.status_code == 200, response.text
    return response.json()


# -- the app through the fake server ---------------------------------------------------------------------
def test_a_pair_streams_through_vllm_one_seeded_request_per_answer_and_a_vote_lands(vllm_app):
    app, client, fake = vllm_app
    assert app.engine.base_name == BASE                        # asked GET /v1/models at start
    texts, last = stream_pair(client, "tell me")
    comparison = app.store.comparison(last["comparison_id"])
    seeds = [body["seed"] for body in fake.chats()]
    assert sorted(texts) == sorted(f"{BASE} says {seed}." for seed in seeds)
    assert [comparison["answer_a"], comparison["answer_b"]] == texts
    assert [c["finish_reason"] for c in last["choices"]] == ["stop", "stop"] and last["usage"]["completion_tokens"] == 6
    assert comparison["version_a"] == comparison["version_b"] == "base" and comparison["policy_version"] == "base"
    for body in fake.chats():                                   # what vLLM was asked
        assert body["model"] == BASE and body["n"] == 1 and body["stream"] and body["max_tokens"] == 8
        assert body["messages"] == [{"role": "user", "content": "tell me"}]
        assert body["temperature"] == app.config.serve.temperature and body["top_p"] == app.config.serve.top_p
    vote = client.post("/v1/feedback", json={"comparison_id": last["comparison_id"], "choice": "a"})
    assert vote.status_code == 200 and app.store.vote_counts()["a"] == 1
    short = client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2}).json()
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 2
    assert app.engine.rows_in_flight() == 0 and app.engine.queue_depth() == 0
    assert 'rlhf_serving_info{version="base"}' in client.get("/metrics").text


def test_serving_a_version_loads_its_adapter_and_rolling_back_unloads_it(vllm_app, tmp_path):
    app, client, fake = vllm_app
    app.store.add_version("v1", adapter_folder(tmp_path), parent="base", run_id=None, metrics={}, status="candidate")
    served = client.post("/api/operator/serve", json={"version": "v1"}, headers=AUTH)
    assert served.status_code == 200 and served.json()["serving_version"] == "v1", served.text
    assert ("load", {"lora_name": "v1", "lora_path": str((tmp_path / "adapters" / "v1").resolve())}) in fake.calls
    answered = pair(client)
    assert answered["model"] == "v1" and all(c["message"]["content"].startswith("v1 says") for c in answered["choices"])
    assert app.store.comparison(answered["comparison_id"])["policy_version"] == "v1"
    assert {body["model"] for body in fake.chats()[-2:]} == {"v1"}

    back = client.post("/api/operator/serve", json={"version": "base"}, headers=AUTH)
    assert back.json()["serving_version"] == "base"
    assert fake.calls[-1] == ("unload", {"lora_name": "v1"}) and fake.loras == {}   # no window: reloading is cheap
    assert pair(client)["choices"][0]["message"]["content"].startswith(f"{BASE} says")
    client.post("/api/operator/serve", json={"version": "v1"}, headers=AUTH)          # and again: a fresh load
    assert [kind for kind, _ in fake.calls].count("load") == 2 and "v1" in fake.loras


def test_a_canary_trial_sends_one_answer_of_each_pair_to_each_version(vllm_app, tmp_path):
    app, client, fake = vllm_app
    app.store.add_version("v1", adapter_folder(tmp_path), parent="base", run_id=None, metrics={}, status="candidate")
    started = client.post("/api/operator/canary", json={"action": "start", "version": "v1"}, headers=AUTH)
    assert started.status_code == 200, started.text
    assert app.engine.second_version == "v1" and "v1" in fake.loras
    for i in range(4):
        answered = pair(client, f"q{i}")
        comparison = app.store.comparison(answered["comparison_id"])
        sides = comparison["version_a"], comparison["version_b"]
        assert sorted(sides) == ["base", "v1"]                  # share 1.0: every pair is a trial pair
        for side, choice in zip(sides, answered["choices"]):
            assert choice["message"]["content"].startswith("v1 says" if side == "v1" else f"{BASE} says")
    assert sorted(body["model"] for body in fake.chats()) == [BASE] * 4 + ["v1"] * 4
    retired = client.post("/api/operator/canary", json={"action": "retire"}, headers=AUTH)
    assert retired.status_code == 200, retired.text
    assert app.engine.second_version is None and fake.loras == {} and ("unload", {"lora_name": "v1"}) in fake.calls


def test_an_adapter_stays_loaded_until_its_answers_in_flight_end(tmp_path, tokenizer):
    """A swap away from v1 while a v1 answer streams: the answer finishes on v1, then v1 is unloaded."""
    from chat_app.vllm_engine import VLLMEngine

    fake = FakeVLLM(chunk_delay_s=0.3)
    engine = VLLMEngine(fake.url, tokenizer, max_context_tokens=256).start()
    try:
        engine.swap(adapter_folder(tmp_path), "v1")
        request = engine.submit(HI, n=1, max_new_tokens=8, seeds=[5])
        assert eventually(lambda: engine.rows_in_flight() == 1)
        engine.swap(None, "base")
        assert "v1" in fake.loras                                # still answering on it
        result = request.result(timeout=30)
        assert result.texts == ["v1 says 5."] and result.versions == ["v1"] and result.version == "v1"
        assert result.ended_with_eos == [True] and result.completion_tokens == [3]
        assert eventually(lambda: fake.loras == {}) and fake.calls[-1] == ("unload", {"lora_name": "v1"})
        assert engine.submit(HI, n=1, seeds=[6]).result(timeout=30).texts == [f"{BASE} says 6."]
        engine.swap(str(tmp_path / "adapters" / "v1"), "v1")
        fake.loras.clear()                                       # another replica sharing the server unloaded it
        assert engine.submit(HI, n=1, seeds=[7]).result(timeout=30).texts == ["v1 says 7."]   # loaded again
        assert [kind for kind, _ in fake.calls].count("load") == 3
    finally:
        engine.stop()
        fake.close()


def test_a_cancelled_request_ends_early_and_a_full_queue_refuses(tmp_path, tokenizer):
    from chat_app.engine import EngineBusy
    from chat_app.vllm_engine import VLLMEngine

    fake = FakeVLLM(chunk_delay_s=0.3)
    engine = VLLMEngine(fake.url, tokenizer, max_context_tokens=256, max_concurrent_answers=2,
                        max_queued_requests=1).start()
    try:
        first = engine.submit(HI, n=2, seeds=[1, 2])        # takes both threads
        assert eventually(lambda: engine.rows_in_flight() == 2)
        second = engine.submit(HI, n=2, seeds=[3, 4])       # waits for a thread
        with pytest.raises(EngineBusy):
            engine.submit(HI, n=2)
        engine.cancel(second)
        engine.cancel(first)
        started = time.perf_counter()
        cut = first.result(timeout=30)                      # ends at its next chunk, with what it had
        assert time.perf_counter() - started < 2 and all(len(t) < len("fake-base says 1.") for t in cut.texts)
        with pytest.raises(RuntimeError, match="cancelled"):
            second.result(timeout=30)                       # never sent
        assert len(fake.chats()) == 2
    finally:
        engine.stop()
        fake.close()


def test_a_long_history_is_cut_as_the_in_process_engine_cuts_it(tokenizer):
    from chat_app.chat import encode_prompt
    from chat_app.vllm_engine import fit_prompt

    turns = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant", "content": "ok " * 20}]
    turns.append({"role": "user", "content": "last question"})
    kept, tokens, dropped, keep_end = fit_prompt(tokenizer, turns, 120)
    assert (tokens, dropped) == (len(encode_prompt(tokenizer, turns, 120)[0]), encode_prompt(tokenizer, turns, 120)[1])
    assert kept[0] == turns[0] and kept[-1] == turns[-1] and len(kept) == len(turns) - dropped and not keep_end
    huge = [{"role": "user", "content": "word " * 500}]
    kept, tokens, dropped, keep_end = fit_prompt(tokenizer, huge, 64)
    assert kept == huge and tokens == 64 and dropped == 1 and keep_end      # vLLM keeps its last 64 tokens


def test_a_vllm_server_that_does_not_answer_stops_the_start_with_one_line(tmp_path):
    from chat_app.app import build_app
    from chat_app.config import ConfigError, load_config
    from chat_app.vllm_engine import VLLMUnavailable
    from conftest import TINY

    url = f"http://127.0.0.1:{free_port()}"
    config = load_config(TINY, [f"serve.db_path={tmp_path / 'feedback.db'}", "serve.engine=vllm",
                                f"serve.vllm_url={url}"])
    with pytest.raises(VLLMUnavailable) as error:
        build_app(config, with_scheduler=False)
    assert url in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="serve.vllm_url"):
        load_config(TINY, ["serve.engine=vllm"])
    with pytest.raises(ConfigError, match="serve.engine"):
        load_config(TINY, ["serve.engine=tgi"])


# -- a real vLLM server ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_real_vllm_server_answers_a_pair_and_swaps_to_an_adapter(tmp_path, monkeypatch):
    """RLHF_TEST_VLLM_URL: a vLLM server started with --enable-lora (README, Beyond one machine; `make test-vllm`
    starts one); RLHF_TEST_VLLM_ADAPTER: a PEFT LoRA folder for its model, else the test writes one as PPO would."""
    url = os.environ.get("RLHF_TEST_VLLM_URL")
    if not url:
        pytest.skip("RLHF_TEST_VLLM_URL is not set: no real vLLM server to test against")
    monkeypatch.setenv("OPERATOR_PASSWORD", "pw")
    model_name = os.environ.get("RLHF_TEST_VLLM_MODEL", "embedded:smollm2")
    adapter = os.environ.get("RLHF_TEST_VLLM_ADAPTER")
    if not adapter:                                   # the policy's LoRA layout, nudged off zero, saved as PPO does
        from chat_app.config import load_config
        from chat_app.model import load_model, load_tokenizer
        from conftest import nudged_policy
        from trainer.ppo import save_policy

        config = load_config(None, [f"model.name={model_name}"])
        tokenizer = load_tokenizer(config.model)
        policy, value_head = nudged_policy(load_model(config.model, tokenizer), config.lora, scale=0.005)
        adapter = str(save_policy(policy, value_head, tmp_path / "v1"))
        del policy
    app, client = in_process_app(tmp_path, ["serve.engine=vllm", f"serve.vllm_url={url}", f"model.name={model_name}"])
    try:
        texts, last = stream_pair(client, "Name a colour.")
        assert all(texts) and last["usage"]["completion_tokens"] > 0
        vote = client.post("/v1/feedback", json={"comparison_id": last["comparison_id"], "choice": "b"})
        assert vote.status_code == 200
        app.store.add_version("v1", adapter, parent="base", run_id=None, metrics={}, status="candidate")
        assert client.post("/api/operator/serve", json={"version": "v1"}, headers=AUTH).status_code == 200
        assert "v1" in app.engine.loaded
        answered = pair(client, "Name a colour.")
        assert answered["model"] == "v1" and all(c["message"]["content"] for c in answered["choices"])
        assert client.post("/api/operator/serve", json={"version": "base"}, headers=AUTH).status_code == 200
        assert "v1" not in app.engine.loaded
    finally:
        app.close()
