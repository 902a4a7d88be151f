#!/usr/bin/env python
"""The one entry point: serve (default), retrain, simulate, evaluate, bench, export, backup, migrate-db, prepare."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def sizes(text: str) -> list[int]:
    """'48,192' -> [48, 192]"""
    return [positive_int(part.strip()) for part in text.split(",") if part.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command")

    def command(name: str, help: str):
        p = sub.add_parser(name, help=help)
        p.add_argument("--config", default="configs/default.yaml", help="YAML config file")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set ppo.kl_coef=0.1 (repeatable)")
        p.add_argument("--db", help="SQLite file or postgresql://user@host:port/dbname (default: serve.db_path)")
        return p

    p = command("serve", "start the chat app (UI, API, scheduler)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--retrain-every", type=float, metavar="MINUTES", help="minutes between retrain checks")
    p.add_argument("--min-votes", type=int, metavar="M", help="new votes needed to start a run")
    p.add_argument("--no-ui", action="store_true", help="serve the HTTP API only, without the Gradio UI")
    p = command("retrain", "run one training cycle (SFT, reward model, PPO, gate) and print a JSON summary")
    p.add_argument("--run-id", type=int, help="(set by the scheduler) the training_runs row to report into")
    from trainer.oracles import BUILTIN   # a small module: no model libraries load to parse arguments

    p = command("simulate", "run the loop headless with simulated users")
    p.add_argument("--oracle", required=True,
                   help=f"a built-in simulated user ({', '.join(BUILTIN)}) or module:function with "
                        "judge(prompt, answer_a, answer_b) -> 'a'|'b'|'tie'")
    p.add_argument("--prompts", help="JSONL with a prompt field, or plain lines (default: the seed prompts)")
    p.add_argument("--votes", type=positive_int, default=100, help="votes per cycle (default 100)")
    p.add_argument("--cycles", type=positive_int, default=1, help="rounds of votes + retraining (default 1)")
    p.add_argument("--server", help="vote through a running app's HTTP API at this URL instead")
    p.add_argument("--no-retrain", dest="retrain", action="store_false",
                   help="only vote (in-process): copy the database afterwards to retrain arms on the same votes")
    p = command("evaluate", "win rates of one policy against another, raw and length-controlled, by one or more judges")
    p.add_argument("--oracle", action="append", required=True, metavar="JUDGE",
                   help=f"a built-in judge ({', '.join(BUILTIN)}) or module:function; repeat it or give a "
                        "comma-separated list to ask several judges about the same answers")
    p.add_argument("--prompts", required=True, help="JSONL with a prompt field, or plain lines")
    p.add_argument("--policy", default="latest",
                   help="a version id (v3), base, or latest (default): the newest version the gate did not reject, or the "
                        "newest of all when it rejected every one")
    p.add_argument("--against", default="base", help="the version it plays against, as --policy (default base)")
    p.add_argument("--samples", type=positive_int, default=1, help="answers per prompt and policy (default 1)")
    p.add_argument("--out", metavar="FILE", help="write every comparison (answers, token counts, verdicts) as JSONL")
    p.add_argument("--reward-agreement", metavar="VERSION", nargs="?", const="policy",
                   help="also score every pair with this version's reward model (default: the policy's) and report "
                        "how often it prefers the policy and agrees with each judge")
    p = command("bench", "measure serving and training speed")
    p.add_argument("--json", action="store_true")
    p.add_argument("--ppo-batch", type=positive_int, default=8, help="PPO rollouts per iteration (default 8)")
    p.add_argument("--response-length", type=positive_int, default=48, help="tokens per rollout (default 48)")
    p.add_argument("--iterations", type=positive_int, default=2, help="PPO iterations timed (default 2)")
    p.add_argument("--rm-sizes", type=sizes, default=[], metavar="N,N",
                   help="vote counts, e.g. 48,192: the reward model's cost cold at each, and warm-started after "
                        "--rm-new-votes more (off by default; minutes per size on CPU)")
    p.add_argument("--rm-new-votes", type=positive_int, default=32, help="new votes for the warm start (default 32)")
    p = command("export", "write the votes as JSONL preference pairs (prompt, chosen, rejected)")
    p.add_argument("--out", default="-", help="file, or - for stdout")
    p = command("backup", "copy the database and the adapter versions it lists into a new folder (safe while serving)")
    p.add_argument("--to", required=True, metavar="DIR", help="a new or empty folder")
    p = command("migrate-db", "copy every table of a database, row for row, into a new empty one (e.g. to PostgreSQL)")
    p.add_argument("--from", dest="source", required=True, metavar="DB", help="the database copied, e.g. feedback.db")
    p.add_argument("--to", dest="target", required=True, metavar="DB",
                   help="an empty database: postgresql://user@host:port/dbname, or a new SQLite file")
    command("prepare", "fetch and cache the model, create the database")
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from chat_app.config import ConfigError, load_config

    overrides = list(args.overrides)
    if args.db:
        overrides.append(f"serve.db_path={args.db}")
    if args.command == "serve":
        overrides += [f"serve.host={args.host}"] * bool(args.host) + [f"serve.port={args.port}"] * bool(args.port)
    try:
        config = load_config(args.config, overrides)
    except (ConfigError, OSError) as error:
        sys.exit(f"run.py: config error: {error}")
    from chat_app.db import is_postgres

    if args.command in ("export", "evaluate", "backup") and not is_postgres(config.serve.db_path) \
            and not os.path.exists(config.serve.db_path):
        sys.exit(f"run.py: no database at {config.serve.db_path} (give --db PATH)")

    if args.command == "serve":
        from chat_app.app import build_app
        from chat_app.server import serve

        from chat_app.vllm_engine import VLLMUnavailable

        try:
            app = build_app(config)
        except VLLMUnavailable as error:   # serve.engine: vllm and no vLLM server answers at serve.vllm_url
            sys.exit(f"run.py: serve: {error}")
        changes = {}
        if args.retrain_every is not None:
            changes["retrain_every_minutes"] = args.retrain_every
        if args.min_votes is not None:
            changes["min_new_votes"] = args.min_votes
        if changes:
            app.scheduler.update_schedule(changes, actor="command line")
        serve(app, with_ui=not args.no_ui)
    elif args.command == "prepare":
        from chat_app.model import load_tokenizer, model_path
        from chat_app.store import Store

        print(json.dumps({"model": model_path(config.model), "vocab": len(load_tokenizer(config.model)),
                          "db": Store(config.serve.db_path).schema_versions()}))
    elif args.command == "retrain":
        from transformers.utils import logging as hf_logging

        from trainer.pipeline import retrain

        hf_logging.disable_progress_bar()   # the run's log holds progress lines, not tqdm bars

        print(json.dumps(retrain(config, run_id=args.run_id), indent=2))
    elif args.command == "simulate":
        from trainer.simulate import simulate

        if args.server and not args.retrain:
            raise SystemExit("simulate: --no-retrain is for the in-process loop; a server retrains on its schedule")
        simulate(config, oracle=args.oracle, prompts_file=args.prompts, votes=args.votes, cycles=args.cycles,
                 server=args.server, retrain_after=args.retrain)
    elif args.command == "evaluate":
        from trainer.evaluate import evaluate_cli

        oracles = [name.strip() for names in args.oracle for name in names.split(",") if name.strip()]
        try:
            result = evaluate_cli(config, oracles=oracles, prompts_file=args.prompts, policy=args.policy,
                                  against=args.against, samples=args.samples, out=args.out,
                                  agreement_of=args.reward_agreement)
        except (ValueError, OSError) as error:   # a misspelt judge or version, a missing or empty prompts file
            sys.exit(f"run.py: evaluate: {error}")
        print(json.dumps(result, indent=2))
    elif args.command == "bench":
        from chat_app.bench import bench

        if any(n < config.reward.min_pairs for n in args.rm_sizes):
            sys.exit(f"run.py: --rm-sizes: each size must be at least reward.min_pairs ({config.reward.min_pairs})")
        bench(config, as_json=args.json, ppo_batch=args.ppo_batch, response_length=args.response_length,
              iterations=args.iterations, rm_sizes=args.rm_sizes, rm_new_votes=args.rm_new_votes)
    elif args.command == "backup":
        from chat_app.backup import backup

        try:
            print(json.dumps(backup(config, args.to), indent=2))
        except (FileExistsError, ValueError) as error:   # a folder not empty; a PostgreSQL database (pg_dump)
            sys.exit(f"run.py: backup: {error}")
    elif args.command == "migrate-db":
        from chat_app.store import copy_database

        try:
            print(json.dumps(copy_database(args.source, args.target), indent=2))   # rows per table
        except (ValueError, OSError) as error:   # a missing source, a target holding rows, no server
            sys.exit(f"run.py: migrate-db: {error}")
    elif args.command == "export":
        from chat_app.store import Store

        rows = Store(config.serve.db_path).export_preferences()
        out = sys.stdout if args.out == "-" else open(args.out, "w")
        for row in rows:
            out.write(json.dumps(row) + "\n")
        if out is not sys.stdout:
            out.close()
            print(f"wrote {len(rows)} preference pairs to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
