"""The retrain loop: a BackgroundScheduler job that starts training subprocesses, then hot-swaps what passes."""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml
from apscheduler.schedulers.background import BackgroundScheduler

from chat_app.app import serving_threads
from trainer.threads import SERVER_PID_ENV

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
JOB_ID = "retrain"


class OperatorError(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Decision:
    start: bool
    reason: str


def should_retrain(*, enabled: bool, is_running: bool, new_votes: int, min_new_votes: int, forced: bool = False
                   ) -> Decision:
    """Whether a check (scheduled, or 'run now' when forced) starts a training run."""
    if is_running:
        return Decision(False, "a training run is already in progress")
    if forced:
        return Decision(True, "started by the operator")
    if not enabled:
        return Decision(False, "the schedule is paused")
    if new_votes < min_new_votes:
        return Decision(False, f"{new_votes} new votes since the last run, need {min_new_votes}")
    return Decision(True, f"{new_votes} new votes since the last run")


def serve_version(app, version: str, actor: str | None, action: str = "serve", details: dict | None = None) -> float:
    """Serve a kept version (or `base`, or `latest`) now; returns the pause in ms. Rejected ones stay rejected.
    `details`: the figures behind the decision, kept with its serving_events row. Other replicas follow the record
    (chat_app/replicas.py)."""
    with app.serving_lock:   # the swap and its record together: this replica's sync loop never sees one alone
        if version == "latest":
            versions = app.store.versions()
            kept = [v for v in versions if v["status"] in ("serving", "retired")]
            if not kept:
                raise OperatorError("no version has passed the gate yet" if versions else
                                    "no version has been trained yet", 404)
            version = kept[-1]["id"]
        if version == "base":
            pause_ms = app.engine.swap(None, "base")
        else:
            row = app.store.version(version)
            if row is None:
                raise OperatorError(f"no version {version!r}", 404)
            if row["status"] == "rejected":
                raise OperatorError(f"{version} was rejected by the gate ({row['reason']}); it is never served", 409)
            if not Path(row["adapter_path"]).exists():
                raise OperatorError(f"{version}'s adapter folder {row['adapter_path']} is missing", 410)
            try:
                pause_ms = app.engine.swap(row["adapter_path"], version)
            except RuntimeError as error:
                raise OperatorError(str(error), 500) from None
        app.store.mark_serving(version, actor, action, details)
        return pause_ms


def trainer_command(config, config_file: Path, run_id: int) -> list[str]:
    """The training subprocess: `run.py retrain`, under `accelerate launch` when schedule.trainer_launcher says so."""
    retrain = [str(ROOT / "run.py"), "retrain", "--config", str(config_file), "--db", config.serve.db_path,
               "--run-id", str(run_id)]
    schedule = config.schedule
    if schedule.trainer_launcher != "accelerate":
        return [sys.executable, *retrain]
    # --multi_gpu is accelerate's multi-process launcher (torchrun) and starts CPU processes too, which then join
    # over gloo (trainer/distributed.py); --cpu would start one process whatever --num_processes says
    processes = ["--multi_gpu", "--num_processes", str(schedule.trainer_processes)] \
        if schedule.trainer_processes > 1 else ["--num_processes", "1"]
    with socket.socket() as probe:   # a free port for the processes to meet: another launch may hold the default
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", *processes, "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", str(schedule.trainer_threads), "--main_process_port", str(port), *retrain]


class RetrainScheduler:
    """Owns the one retrain job; settings live in the store so they survive a restart."""

    SETTINGS_KEY = "schedule"

    def __init__(self, app, clock=None):
        self.app = app
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.lock = threading.Lock()
        self.process: subprocess.Popen | None = None
        self.current_run_id: int | None = None
        self.last_decision = Decision(False, "not checked yet")
        self.last_check_at: datetime | None = None
        defaults = app.config.schedule
        stored = app.store.get_setting(self.SETTINGS_KEY, {})
        self.settings = {"enabled": defaults.enabled, "retrain_every_minutes": defaults.retrain_every_minutes,
                         "min_new_votes": defaults.min_new_votes, **stored}

    # -- settings ----------------------------------------------------------------------------
    def schedule(self) -> dict:
        job = self.scheduler.get_job(JOB_ID) if self.scheduler.running else None
        next_at = job.next_run_time.isoformat() if job and job.next_run_time else None
        return {**self.settings, "next_check_at": next_at, "is_running": self.is_running(),
                "current_run_id": self.current_run_id, "last_decision": self.last_decision.reason,
                "schedule_holder": self.app.is_schedule_holder,
                "last_check_at": self.last_check_at.isoformat() if self.last_check_at else None,
                "new_votes": self.new_votes()}

    def update_schedule(self, changes: dict, actor: str | None = None) -> dict:
        """Change enabled / retrain_every_minutes / min_new_votes; stored at once, applied at once."""
        allowed = {"enabled": bool, "retrain_every_minutes": (int, float), "min_new_votes": int}
        for key, value in changes.items():
            if key not in allowed:
                raise OperatorError(f"unknown schedule setting {key!r}; use {', '.join(allowed)}")
            if isinstance(value, bool) != (allowed[key] is bool) or not isinstance(value, allowed[key]):
                raise OperatorError(f"{key} has the wrong type: {value!r}")
        # `not 0 < x <= ...` also refuses NaN; an infinite or huge interval would overflow APScheduler's timedelta
        minutes, votes = changes.get("retrain_every_minutes", 1), changes.get("min_new_votes", 0)
        if not 0 < minutes <= 7 * 24 * 60 or not 0 <= votes <= 10**9:
            raise OperatorError("retrain_every_minutes must be > 0 and at most a week (10080); "
                                "min_new_votes from 0 to 10^9")
        self.reload_settings()   # another replica's change first: this one's must not undo it
        self.settings.update(changes)
        self.app.store.set_setting(self.SETTINGS_KEY, self.settings)
        if self.scheduler.running:
            self._install_job()
        log.info("schedule changed by %s: %s", actor, changes)
        return self.schedule()

    # -- the job -----------------------------------------------------------------------------
    def start(self):
        self.scheduler.start()
        self._install_job()
        if self.app.store.get_setting(self.SETTINGS_KEY) is None:
            self.app.store.set_setting(self.SETTINGS_KEY, self.settings)
        if self.app.is_schedule_holder:   # a replica that does not lead must not fail the leader's run
            self._recover_orphan_runs()

    def became_holder(self):
        """This replica took the schedule from one that died: its settings as stored now, its runs left behind."""
        self.reload_settings()
        self._recover_orphan_runs()

    def reload_settings(self):
        """Apply schedule settings another replica stored (an operator's change through it)."""
        stored = self.app.store.get_setting(self.SETTINGS_KEY)
        with self.lock:
            if stored and {**self.settings, **stored} != self.settings:
                self.settings.update(stored)
                if self.scheduler.running:
                    self._install_job()
                log.info("schedule settings from the database: %s", stored)

    def shutdown(self):
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def _install_job(self):
        minutes = float(self.settings["retrain_every_minutes"])
        self.scheduler.add_job(self.check, "interval", minutes=minutes, id=JOB_ID, replace_existing=True,
                               max_instances=1, coalesce=True, misfire_grace_time=None)
        if not self.settings["enabled"]:
            self.scheduler.pause_job(JOB_ID)

    def _recover_orphan_runs(self):
        """Runs left 'running' by a server that died are failed, so the next check can start again."""
        for run in self.app.store.runs(limit=20):
            if run["status"] == "running":
                self.app.store.finish_run(run["id"], "failed", error="the server stopped while this run was going")

    def new_votes(self) -> int:
        """Votes since the last run that read them: a run skipped for too few pairs trained on nothing, so its
        votes still count towards the next one; a run skipped because its reward model read them no better than
        chance (`reward.min_skill_confidence`) did read them, and the next waits for new votes."""
        last = self.app.store.last_run(("running", "succeeded", "rejected", "failed"))
        read = next((r for r in self.app.store.runs(limit=20) if r["status"] == "skipped"
                     and "rm/chance_p_value" in (r["metrics"] or {})), None)
        if read is not None and (last is None or read["id"] > last["id"]):
            last = read
        return self.app.store.votes_since(last["started_at"] if last else None)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self, forced: bool = False, actor: str = "scheduler") -> Decision:
        """One scheduled check: start a run when the decision says so."""
        with self.lock:
            if not self.app.is_schedule_holder:   # exactly one replica trains (chat_app/replicas.py)
                holder = self.app.replicas.held_by() or {}
                decision = Decision(False, f"another replica holds the retrain schedule "
                                           f"({holder.get('replica', 'unknown')}); this one only serves")
            else:
                decision = should_retrain(enabled=self.settings["enabled"], is_running=self.is_running(),
                                          new_votes=self.new_votes(),
                                          min_new_votes=int(self.settings["min_new_votes"]), forced=forced)
            self.last_decision, self.last_check_at = decision, self.clock()
            log.info("retrain check: %s", decision.reason)
            if decision.start:
                self._launch(trigger=actor)
            return decision

    def run_now(self, actor: str = "operator") -> tuple[bool, str]:
        decision = self.check(forced=True, actor=actor)
        return decision.start, decision.reason if not decision.start else f"run {self.current_run_id} started"

    def _launch(self, trigger: str):
        """Start `run.py retrain` in a subprocess with its own thread budget, and watch it."""
        config = self.app.config
        run_id = self.app.store.start_run(trigger)
        runs_dir = Path(config.serve.adapters_dir).parent / "runs"   # beside the adapters
        runs_dir.mkdir(parents=True, exist_ok=True)
        config_file = runs_dir / f"run-{run_id}.yaml"
        data = dataclasses.asdict(config)
        data.pop("source", None)
        config_file.write_text(yaml.safe_dump(data))
        threads = str(config.schedule.trainer_threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "GRADIO_ANALYTICS_ENABLED": "False", SERVER_PID_ENV: str(os.getpid())}   # borrows our core when idle
        log_path = runs_dir / f"run-{run_id}.log"
        cmd = trainer_command(config, config_file, run_id)
        log_file = open(log_path, "w")
        self.process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
        self.current_run_id = run_id
        self.app.engine.threads = serving_threads(config, training=True)   # leave the trainer its cores
        self.app.store.update_run(run_id, pid=self.process.pid)
        log.info("training run %d started (pid %d, log %s)", run_id, self.process.pid, log_path)
        threading.Thread(target=self._watch, args=(self.process, run_id, log_path, log_file), daemon=True,
                         name=f"watch-run-{run_id}").start()

    def _watch(self, process: subprocess.Popen, run_id: int, log_path: Path, log_file):
        code = process.wait()
        log_file.close()
        self.app.engine.threads = serving_threads(self.app.config, training=False)
        self.after_run(run_id, code, log_path)
        self.app.metrics.training_run(self.app.store.run(run_id))   # its final status, crash or not

    def after_run(self, run_id: int, exit_code: int, log_path: Path | None = None):
        """Record a crash; hot-swap a candidate that passed the gate."""
        store = self.app.store
        run = store.run(run_id)
        if run["status"] == "running":   # the process died without saying how: crash, OOM kill, signal
            tail = log_path.read_text()[-3000:] if log_path and log_path.exists() else ""
            store.finish_run(run_id, "failed", error=f"training process exited with code {exit_code}\n{tail}")
            log.error("training run %d failed (exit code %d); still serving %s", run_id, exit_code,
                      self.app.serving_version())
            return
        if run["status"] == "succeeded" and run["candidate_version"]:
            version = run["candidate_version"]
            canary = self.app.canary
            if canary is not None and canary.state["share"] > 0:   # the users decide, on a share of comparisons
                try:
                    canary.begin(version)
                except RuntimeError as error:
                    store.set_version_status(version, "rejected", reason=f"could not load as a canary: {error}")
                    log.error("could not start %s as a canary: %s", version, error)
                return
            try:
                pause_ms = serve_version(self.app, version, actor="scheduler", action="promote")
                log.info("promoted %s (serving paused %.0f ms)", version, pause_ms)
            except OperatorError as error:
                store.set_version_status(version, "rejected", reason=f"hot-swap failed: {error}")
                log.error("could not serve %s: %s", version, error)
