"""`run.py bench` runs end to end on the tiny model and reports every figure the issue asks for (no timing asserted)."""
import json
import os
import subprocess
import sys

from conftest import ROOT, TINY


def test_bench_reports_every_figure_beside_its_baseline():
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "bench", "--config", TINY, "--json", "--iterations", "1",
                          "--ppo-batch", "4", "--response-length", "8",
                          "--rm-sizes", "16", "--rm-new-votes", "8"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout[out.stdout.index("{\n"):])
    assert results["engine_weights"] == "packed"                 # the CPU default, measured against the loaded model
    assert results["loaded_weights_engine"]["one_pair_ms_per_step"] > 0
    assert abs(results["serving_copy_quality"]["kl_per_token"]) < 1e-3
    assert results["serving_copy_quality"]["argmax_agreement"] > 0.99
    one = results["one_pair"]
    assert one["ms_per_step"] > 0 and one["plain_generate_ms_per_step"] > 0 and one["first_token_ms"] > 0
    assert one["ratio_to_plain"] == one["ms_per_step"] / one["plain_generate_ms_per_step"]
    eight = results["eight_users"]
    assert eight["tokens_per_s"] > 0 and eight["one_at_a_time_tokens_per_s"] > 0
    assert eight["plain_generate_tokens_per_s"] > 0
    assert results["with_lora"]["one_pair_ms_per_step"] > 0
    mixed = results["mixed_versions"]                           # a canary trial: two versions in one step
    assert mixed["one_pair_ms_per_step"] > 0 and mixed["eight_users_tokens_per_s"] > 0
    assert mixed["quarter_trial_tokens_per_s"] > 0
    assert results["hot_swap"]["requests_failed"] == 0 and results["hot_swap"]["pause_ms"] >= 0
    assert set(results["during_training"]) == {"split", "split_borrowing", "default_threads"}
    training = results["training"]
    assert training["rm_pairs_per_s"] > 0 and training["ppo_rollout_s"] > 0 and training["ppo_update_s"] > 0
    assert set(training["rollout_generation_s"]) == {"packed", "hf_model"}
    if (os.cpu_count() or 1) > 1:                               # the trainer's iteration with the idle server's core
        assert training["ppo_iteration_idle_server_s"] > 0 and training["idle_server_threads"] > 1
    (scaling,) = results["reward_scaling"]
    assert scaling["cold"]["tokenized_pairs"] == 16 and scaling["warm_votes"] == 24
    assert scaling["warm"]["tokenized_pairs"] == 8                # only the new votes are read and tokenised
    assert scaling["warm"]["train_pairs"] < 24 - scaling["warm"]["heldout_pairs"]   # not everything again
    assert results["peak_memory_mb"]["serving_then_training"] >= results["peak_memory_mb"]["serving"] > 0


def test_bad_bench_arguments_are_one_line_errors():
    for args, message in ((["--rm-sizes", "abc"], "argument --rm-sizes: expected a whole number, got 'abc'"),
                          (["--iterations", "-1"], "argument --iterations: must be at least 1, got -1"),
                          (["--rm-sizes", "4"], "--rm-sizes: each size must be at least reward.min_pairs (8)")):
        out = subprocess.run([sys.executable, str(ROOT / "run.py"), "bench", "--config", TINY, *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
