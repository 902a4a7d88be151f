"""Several replicas, one loop: `run.py serve` processes on one PostgreSQL database and one adapters folder.

Every replica serves what the database says. A short poll (`serve.sync_every_seconds`) reads the version marked
serving and the canary trial's state and, where they differ from what this engine serves, applies them
(`engine.swap`, `engine.set_second`): a promotion or a rollback made on any replica, by the votes or by an operator,
reaches all of them within seconds.

Exactly one replica holds the retrain schedule: a PostgreSQL session-level advisory lock (chat_app.db.AdvisoryLock)
on a connection of its own, held while the process lives. The others try again every
`serve.schedule_lock_retry_seconds` and take over when the holder dies (its session closes, the lock frees). The
holder alone starts training runs and makes the canary's automatic decisions, on every replica's trial votes (it
reads them from the database). On SQLite there is one process: it always holds the schedule and no loop runs.

No consensus of our own: PostgreSQL's lock says who trains, its tables say what is served.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

from chat_app.db import AdvisoryLock, is_postgres
from chat_app.store import utc_now

log = logging.getLogger(__name__)
HOLDER_KEY = "schedule_holder"   # settings row: which replica took the schedule last, and when


class Replicas:
    """This process's part among the replicas: whether it holds the schedule, and the loop that follows the
    database."""

    def __init__(self, app):
        self.app = app
        self.config = app.config.serve
        self.name = f"{socket.gethostname()}:{self.config.port} (pid {os.getpid()})"
        self.lock = AdvisoryLock(app.store.path, "schedule") if is_postgres(app.store.path) else None
        self._unservable: str | None = None      # a version that failed to load here: not retried every poll
        self._trial_votes: tuple | None = None   # what the holder last decided the trial on
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="replica-sync", daemon=True)
        if self.lock is not None:
            self.take_schedule()   # now, so the scheduler and the canary start knowing whether they lead

    @property
    def is_holder(self) -> bool:
        return self.lock is None or self.lock.held

    def held_by(self) -> dict | None:
        """{replica, since} of the replica that took the schedule last (None on SQLite)."""
        return self.app.store.get_setting(HOLDER_KEY) if self.lock is not None else None

    def start(self) -> "Replicas":
        if self.lock is not None:
            self._thread.start()
        return self

    def stop(self):
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if self.lock is not None:
            self.lock.release()   # the next replica takes the schedule at its next try

    # -- the schedule --------------------------------------------------------------------------
    def take_schedule(self) -> bool:
        """Try for the lock (or check that a held one still is); on taking it, this replica leads the loop."""
        had = self.lock.held
        if self.lock.try_acquire() and not had:
            self.app.store.set_setting(HOLDER_KEY, {"replica": self.name, "since": utc_now()})
            log.info("this replica (%s) holds the retrain schedule", self.name)
            if self.app.scheduler is not None:
                self.app.scheduler.became_holder()
        elif had and not self.lock.held:
            log.warning("lost the retrain schedule (its database session ended); trying again every %g s",
                        self.config.schedule_lock_retry_seconds)
        return self.lock.held

    # -- following the database ----------------------------------------------------------------
    def sync(self):
        """One poll: serve the version and the trial the database says; the holder decides on new trial votes and
        applies schedule settings changed through another replica."""
        self.follow_serving()
        if self.app.canary is not None:
            self.app.canary.follow()
            if self.is_holder:
                self.decide_trial()
        if self.is_holder and self.app.scheduler is not None:
            self.app.scheduler.reload_settings()

    def follow_serving(self):
        """Swap to the version marked serving when the engine serves another."""
        with self.app.serving_lock:   # never between another thread's swap and its record (scheduler.serve_version)
            row = self.app.store.serving_version()
            version = row["id"] if row else "base"
            if version in (self.app.engine.version, self._unservable):
                return
            try:
                pause_ms = self.app.engine.swap(row["adapter_path"] if row else None, version)
            except RuntimeError as error:   # the shared adapters folder lacks it here: keep serving, say so once
                self._unservable = version
                log.error("the database says %s serves, but this replica cannot load it (%s); still serving %s",
                          version, error, self.app.engine.version)
                return
            self._unservable = None
            log.info("serving %s, as the database says (changed elsewhere; paused %.1f ms)", version, pause_ms)

    def decide_trial(self):
        """The holder's automatic canary decision, whenever trial votes arrived through any replica."""
        canary = self.app.canary
        trial = canary.trial
        if not trial:
            self._trial_votes = None
            return
        seen = self.app.store.cross_version_vote_count(trial["phase_started_at"],
                                                       (trial["candidate"], trial["incumbent"]))
        key = (trial["candidate"], trial["phase"], canary.state["auto"], *seen)
        if key != self._trial_votes:
            self._trial_votes = key
            canary.decide_now()   # acts only in automatic mode, only on the holder

    def _loop(self):
        retry, every = self.config.schedule_lock_retry_seconds, self.config.sync_every_seconds
        next_lock = next_sync = time.monotonic()
        while not self._stopping.is_set():
            now = time.monotonic()
            try:
                if now >= next_lock:
                    next_lock = now + retry
                    self.take_schedule()
                if every > 0 and now >= next_sync:
                    next_sync = now + every
                    self.sync()
            except Exception:   # a failed poll (the database restarting) must not end the loop
                log.exception("replica sync failed")
            due = min(next_lock, next_sync) if every > 0 else next_lock
            self._stopping.wait(max(0.05, due - time.monotonic()))
