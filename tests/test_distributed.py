"""Data-parallel PPO: one update in 2 CPU processes (gloo) equals the update in one; the scheduler's accelerate launch.

Run as a script by torchrun, this file is the 2-process side: `python -m torch.distributed.run --nproc_per_node 2
tests/test_distributed.py FOLDER` runs `ppo_step` on FOLDER/experience.pt and rank 0 writes FOLDER/two.pt.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import nudged_policy

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
# a PPO-ptx term too: it is the same on every process, and must count once
OVERRIDES = ["ppo.epochs=2", "ppo.minibatch_size=4", "ppo.target_kl=0", "ppo.learning_rate=0.01", "ppo.ptx_coef=0.5"]
DEMOS = [{"prompt_messages": [{"role": "user", "content": "Cats?"}], "answer": "Cats purr."},
         {"prompt_messages": [{"role": "user", "content": "Dogs?"}], "answer": "Dogs bark loudly."}]


def tiny_setup():
    """(cfg, tokenizer, policy, value_head): the tiny model with a non-zero adapter and value head, the same each call."""
    from chat_app.config import load_config
    from chat_app.model import load_model, load_tokenizer
    cfg = load_config(TINY, OVERRIDES)
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    policy, value_head = nudged_policy(load_model(cfg.model, tokenizer), cfg.lora)
    return cfg, tokenizer, policy, value_head


def trainable(policy, value_head) -> dict[str, torch.Tensor]:
    """Every trained tensor (LoRA and value head) by name, detached copies."""
    named = [*policy.named_parameters(), *(("value_head." + n, p) for n, p in value_head.named_parameters())]
    return {name: p.detach().clone() for name, p in named if p.requires_grad}


def one_update(folder: Path) -> tuple[dict, dict]:
    """(weights, metrics) after one `ppo_step` on folder/experience.pt, in this process's share of each minibatch."""
    from trainer.ppo import ppo_step
    from trainer.sft import sft_loss

    cfg, tokenizer, policy, value_head = tiny_setup()
    exp = torch.load(folder / "experience.pt")
    params = [p for p in [*policy.parameters(), *value_head.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.ppo.learning_rate, eps=1e-5)
    metrics = ppo_step(policy, value_head, optimizer, exp, cfg.ppo, torch.Generator().manual_seed(0),
                       ptx_loss=lambda: sft_loss(policy, tokenizer, DEMOS, 256))
    return trainable(policy, value_head), metrics


def make_experience_file(folder: Path) -> dict:
    """A fixed experience batch of 8 answers with very unequal lengths (1 to 12 tokens), saved to folder."""
    from trainer.ppo import RunningMoments, make_experience, pack_query_response

    cfg, tokenizer, policy, value_head = tiny_setup()
    generator = torch.Generator().manual_seed(1)
    lengths = [1, 12, 3, 9, 12, 2, 7, 4]
    prompts = [[1, 9, 15 + row, 23, 4][: 2 + row % 4] for row in range(len(lengths))]
    responses = [torch.randint(100, 5000, (n,), generator=generator).tolist() for n in lengths]
    batch = {**pack_query_response(prompts, responses, tokenizer.pad_token_id, "cpu"),
             "ended_with_eos": torch.tensor([n < 12 for n in lengths])}
    scores = torch.randn(len(lengths), generator=generator)
    exp = make_experience(policy, value_head, batch, scores, cfg.ppo, RunningMoments())
    torch.save(exp, folder / "experience.pt")
    return exp


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_make_the_one_process_update(tmp_path):
    exp = make_experience_file(tmp_path)
    # the halves of a minibatch hold unequal token counts: a mean of the two halves' means would not be the
    # minibatch's mean; the processes weight theirs by token share (global sum / global count)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    tokens = [exp["mask"][order[s:s + 4][r::2]].sum().item() for s in (0, 4) for r in (0, 1)]
    assert tokens[0] != tokens[1] or tokens[2] != tokens[3], tokens

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, str(tmp_path)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt")
    assert two["same_on_every_process"]

    one_weights, one_metrics = one_update(tmp_path)
    _, _, policy, value_head = tiny_setup()
    start = trainable(policy, value_head)
    moved = max((one_weights[k] - start[k]).abs().max().item() for k in start)
    difference = max((one_weights[k] - two["weights"][k]).abs().max().item() for k in start)
    print(f"largest weight change {moved:.3g}; largest 1-vs-2-process difference {difference:.3g}")
    assert moved > 1e-3                                          # the update did move the weights
    assert difference < 1e-5                                     # measured: about 1e-7
    for key in ("ppo/loss", "ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl", "ppo/clipfrac", "ppo/ptx_loss"):
        assert two["metrics"][key] == pytest.approx(one_metrics[key], rel=1e-4, abs=1e-6), key


def test_the_scheduler_starts_accelerate_launch_when_asked(tiny_config, tmp_path):
    from chat_app.config import ConfigError, load_config
    from chat_app.scheduler import trainer_command

    plain = trainer_command(tiny_config, tmp_path / "run-3.yaml", 3)
    assert plain == [sys.executable, str(ROOT / "run.py"), "retrain", "--config", str(tmp_path / "run-3.yaml"),
                     "--db", tiny_config.serve.db_path, "--run-id", "3"]
    tiny_config.schedule.trainer_launcher, tiny_config.schedule.trainer_processes = "accelerate", 2
    cmd = trainer_command(tiny_config, tmp_path / "run-3.yaml", 3)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    launcher_args = cmd[3:cmd.index(str(ROOT / "run.py"))]
    assert launcher_args[launcher_args.index("--num_processes") + 1] == "2" and "--multi_gpu" in launcher_args
    assert "--cpu" not in launcher_args                          # it would start one process, whatever the count
    assert cmd[len(cmd) - len(plain) + 1:] == plain[1:]          # then the same `run.py retrain ...`
    with pytest.raises(ConfigError, match="schedule.trainer_launcher"):
        load_config(TINY, ["schedule.trainer_launcher=mpi"])


@pytest.mark.slow
def test_a_retrain_through_accelerate_launch_registers_one_version(tiny_config, tmp_path):
    import dataclasses

    import yaml

    from chat_app.scheduler import trainer_command
    from chat_app.store import Store
    from test_pipeline import add_votes                         # rootdir-relative, as pytest imports tests

    store = Store(tiny_config.serve.db_path)
    add_votes(store, 24)
    run_id = store.start_run("test")
    tiny_config.schedule.trainer_launcher = "accelerate"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({k: v for k, v in dataclasses.asdict(tiny_config).items() if k != "source"}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    out = subprocess.run(trainer_command(tiny_config, config_file, run_id), env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert '"status": "PPO share done"' in out.stdout            # rank 1 trained its share, then exited
    assert out.stdout.count("ppo 1/2") == 1                      # one log line per iteration: rank 0's
    run = store.run(run_id)
    assert run["status"] in ("succeeded", "rejected") and len(store.versions()) == 1, run


if __name__ == "__main__":   # one of torchrun's processes
    import torch.distributed as dist

    from trainer import distributed

    torch.set_num_threads(1)
    distributed.init_from_env()
    folder = Path(sys.argv[1])
    weights, metrics = one_update(folder)
    flat = torch.cat([w.reshape(-1) for w in weights.values()])
    copies = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, flat)
    if distributed.is_main():
        torch.save({"weights": weights, "metrics": metrics,
                    "same_on_every_process": all(torch.equal(c, flat) for c in copies)}, folder / "two.pt")
    distributed.finish()
