"""Real SmolLM2-135M-Instruct tests (minutes on 2 CPU cores): `make test-slow`, or pytest -m slow."""
import json
import os
import subprocess
import sys

import httpx
import pytest

from conftest import ROOT, start_server, stop_server

pytestmark = pytest.mark.slow
DEFAULT = str(ROOT / "configs" / "default.yaml")


def test_real_model_serves_pairs_and_records_votes_end_to_end(tmp_path):
    """`run.py serve` with the embedded model: an OpenAI client gets two real answers, the vote lands in SQLite."""
    openai = pytest.importorskip("openai")
    process, url = start_server(tmp_path, ["--config", DEFAULT, "--no-ui"], env={"OMP_NUM_THREADS": "2"})
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        reply = client.chat.completions.create(model="base", n=2, max_tokens=32, temperature=0.0,  # greedy
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        answers = [c.message.content for c in reply.choices]
        assert all(len(a.split()) >= 2 for a in answers), answers        # real words, not token soup
        assert all("Paris" in a for a in answers), answers                # the real model, not noise
        assert httpx.post(url + "/v1/feedback", json={"comparison_id": reply.id, "choice": "a"}).status_code == 200
        assert httpx.get(url + "/api/status").json()["votes"]["a"] == 1
    finally:
        stop_server(process)


def test_the_loop_learns_a_simulated_preference(tmp_path):
    """simulate (votes by the `concise` oracle) + one retrain, then evaluate on prompts the loop never saw."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    votes = os.environ.get("SLOW_TEST_VOTES", "160")
    common = ["--config", DEFAULT, "--db", str(tmp_path / "f.db"), "--set", f"serve.adapters_dir={tmp_path}/adapters",
              "--set", "serve.max_new_tokens=64", "--set", "ppo.response_length=64"]
    sim = subprocess.run([sys.executable, "run.py", "simulate", *common, "--oracle", "concise", "--votes", votes,
                          "--cycles", "1"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    cycle = json.loads([line for line in sim.stdout.splitlines() if line.startswith('{"cycle"')][-1])
    print(json.dumps(cycle, indent=1))
    assert cycle["status"] == "succeeded", cycle
    evaluation = subprocess.run([sys.executable, "run.py", "evaluate", *common, "--oracle", "concise",
                                 "--prompts", "trainer/eval_prompts.jsonl", "--policy", "latest", "--against", "base",
                                 "--samples", "2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    result = json.loads(evaluation.stdout[evaluation.stdout.index("{"):])
    print(json.dumps(result, indent=1))
    assert result["judges"]["concise"]["decided_win_rate"] > 0.6, result
