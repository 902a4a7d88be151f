"""The Gradio UI (layout only): a chat tab that shows two answers and takes a vote, and the operator tab.

The decisions live in plain functions (chat.py, store.py, scheduler.py, status.py, plots.py); the handlers
here only read the session, call them, and convert the result into component updates.
"""
from __future__ import annotations

import hmac
import json
import os
import queue
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

import gradio as gr
import pandas as pd

from chat_app import plots
from chat_app.chat import (VOTE_LABELS, cast_vote, chosen_answer, finish_pair, start_pair, truncation_notice,
                           turn_refusal, with_system_prompt)
from chat_app.scheduler import OperatorError, serve_version
from chat_app.status import serving_line
from chat_app.store import CHOICES

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate")
CSS = """
.answer-panel { border: 1px solid var(--border-color-primary); border-radius: var(--radius-lg);
                padding: 0.5em 0.9em; min-height: 9em; background: var(--background-fill-secondary); }
.answer-panel .answer-label { font-weight: 700; font-size: 1.1em; }
#serving-line { font-size: 0.95em; opacity: 0.85; }
#vote-status, #truncation-notice, #op-message, #op-action { min-height: 1.2em; }
#truncation-notice { color: var(--color-accent); }
"""
WAITING = "*…*"
SERVING_REFRESH_S = 10
PAUSE, RESUME = "Pause schedule", "Resume schedule"
BY_HAND, BY_VOTES = "Decide by hand", "Let the votes decide"
OPERATOR_REFRESH_S = 2


# -- chat tab -------------------------------------------------------------------------------------
def new_session() -> dict:
    """One browser session's conversation: plain-text history and the turn being answered."""
    return {"conversation_id": None, "history": [], "turn": None}


def new_turn(prompt: list[dict]) -> dict:
    """stage: queued -> streaming -> done (votable) | failed; resolved once an answer joined the conversation."""
    return {"prompt": prompt, "stage": "queued", "comparison_id": None, "answers": ["", ""]}


def shown(answer: str, ended_with_eos: bool = True, tokens: int = 0) -> str:
    """Panel text for an answer (Markdown, HTML sanitised by Gradio). One cut off at the token limit says so, as the
    voter may judge an unfinished answer differently; the stored answer stays the model's raw text."""
    text = answer if answer.strip() else "*(empty answer)*"
    return text if ended_with_eos else f"{text}\n\n*(cut at {tokens} tokens)*"


def build_chat_tab(app) -> gr.Blocks:
    serve = app.config.serve
    claim = threading.Lock()  # one stream per queued turn, even when two Send clicks race
    with gr.Blocks() as tab:
        session = gr.State(new_session())
        serving = gr.Markdown(elem_id="serving-line")
        conversation = gr.Chatbot(label="Conversation", elem_id="conversation", height=340, buttons=["copy"],
                                  placeholder="Send a message: two answers appear below; pick the better one.")
        with gr.Row(equal_height=True):
            answers = []
            for name in ("A", "B"):
                with gr.Column(elem_classes="answer-panel"):
                    gr.Markdown(f"**{name}**", elem_classes="answer-label")
                    answers.append(gr.Markdown(WAITING, elem_id=f"answer-{name.lower()}", line_breaks=True))
        answer_a, answer_b = answers
        with gr.Row():
            buttons = {c: gr.Button(VOTE_LABELS[c], interactive=False, elem_id=f"vote-{c}") for c in CHOICES}
        notice = gr.Markdown(elem_id="vote-status")
        truncated = gr.Markdown(elem_id="truncation-notice")
        with gr.Row():
            box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, elem_id="msg-box",
                             scale=6, max_lines=8, autofocus=True, min_width=280)
            send = gr.Button("Send", variant="primary", elem_id="send-btn", scale=1)
        with gr.Row():
            regenerate = gr.Button("Regenerate", elem_id="regenerate-btn", size="sm")
            new_chat = gr.Button("New chat", elem_id="new-chat-btn", size="sm")
        with gr.Accordion("Write a better answer", open=False, elem_id="better-accordion"):
            better_box = gr.Textbox(lines=4, show_label=False, elem_id="better-box",
                                    placeholder="The answer you would have liked; it replaces A and B.")
            better_send = gr.Button("Use my answer", elem_id="better-btn")
        timer = gr.Timer(SERVING_REFRESH_S)

        def voting(enabled: bool) -> dict:
            # updates made at call time: a gr.Button(...) made here, inside the Blocks, would add a button
            return {button: gr.update(interactive=enabled) for button in buttons.values()}

        def cleared() -> dict:
            return {answer_a: WAITING, answer_b: WAITING, **voting(False), notice: "", truncated: ""}
        outputs = [session, conversation, box, answer_a, answer_b, *buttons.values(), notice, truncated, serving,
                   better_box]

        def resolve(state: dict, answer: str) -> None:
            """The turn's answer joins the conversation (in the session and in the store)."""
            turn = state["turn"]
            state["history"].append({"role": "assistant", "content": answer})
            app.store.add_message(state["conversation_id"], "assistant", answer, comparison_id=turn["comparison_id"])
            turn["stage"] = "resolved"

        def submit(message: str, state: dict, request: gr.Request):
            text = (message or "").strip()
            stage = state["turn"]["stage"] if state["turn"] else None
            if not text:
                return {notice: "⚠️ Type a message first."}
            if stage in ("queued", "streaming"):
                return {notice: "⚠️ Wait until both answers are complete."}
            if stage == "done":
                return {notice: "⚠️ Pick the better answer (or write your own) before sending the next message."}
            refusal = turn_refusal(state["history"], text, app.config.limits)   # the API's limits (config `limits`)
            if refusal:
                return {notice: f"⚠️ {refusal}"}
            if state["conversation_id"] is None:  # created lazily: an idle visitor leaves no row
                state["conversation_id"] = app.store.create_conversation(source="ui", session=request.session_hash)
            state["history"].append({"role": "user", "content": text})
            app.store.add_message(state["conversation_id"], "user", text)
            state["turn"] = new_turn(with_system_prompt([dict(m) for m in state["history"]], serve.system_prompt))
            return {session: state, conversation: list(state["history"]), box: "", **cleared()}

        def stream(state: dict):
            """Sample the queued turn's pair and stream both answers into their panels."""
            turn = state["turn"]
            with claim:
                if turn is None or turn["stage"] != "queued":
                    # this click was refused, or another event already streams the turn. Say "no change":
                    # a step that yields nothing sets every output to empty (Gradio 6), blanking the page
                    yield {notice: gr.skip()}
                    return
                turn["stage"] = "streaming"
            try:
                comparison_id, request = start_pair(
                    app.store, app.engine, turn["prompt"], source="ui", max_new_tokens=serve.max_new_tokens,
                    temperature=serve.temperature, top_p=serve.top_p, conversation_id=state["conversation_id"],
                    versions=app.canary.versions_for_new_pair() if app.canary else None)
            except Exception as error:  # say so and keep the page usable: Regenerate tries again
                turn["stage"] = "failed"
                yield {notice: f"⚠️ Could not ask the model ({error}). Press Regenerate to try again."}
                return
            turn["comparison_id"] = comparison_id
            texts, result, error = ["", ""], None, None
            try:
                for event in request.stream():
                    if event[0] == "token":
                        texts[event[1]] += event[2]
                        if request.events.empty() and state["turn"] is turn:  # caught up: one update, many tokens
                            yield {answer_a: texts[0], answer_b: texts[1]}
                    elif event[0] == "done":
                        result = event[1]
                    else:
                        error = event[1]
            except queue.Empty:
                error = "no answer from the model in time"
            if result is not None:
                finish_pair(app.store, comparison_id, result)
                turn["answers"], turn["stage"] = list(result.texts), "done"
            else:
                app.store.delete_comparison(comparison_id)
                turn["comparison_id"], turn["stage"] = None, "failed"
            if state["turn"] is not turn:  # "New chat" was pressed meanwhile: the pair is stored, not shown
                return
            if result is None:
                yield {answer_a: WAITING, answer_b: WAITING,
                       notice: f"⚠️ The model could not answer ({error}). Press Regenerate to try again."}
                return
            a, b = (shown(*answer) for answer in zip(result.texts, result.ended_with_eos, result.completion_tokens))
            yield {answer_a: a, answer_b: b, **voting(True),
                   notice: "Which answer is better?", truncated: truncation_notice(result.turns_dropped)}

        def vote_handler(choice: str):
            def handle(state: dict, request: gr.Request):
                turn = state["turn"]
                if turn is None or turn["stage"] != "done":
                    return {notice: "⚠️ There is no finished pair of answers to vote on.", **voting(False)}
                status, message = cast_vote(app.store, turn["comparison_id"], choice, voter=request.session_hash)
                if status == "ok":
                    resolve(state, chosen_answer(choice, *turn["answers"]))
                    if choice in ("tie", "both_bad"):
                        message += " Answer A continues the conversation."
                return {session: state, conversation: list(state["history"]), notice: message, **voting(False),
                        serving: serving_line(app)}
            return handle

        def write_better(text: str, state: dict, request: gr.Request):
            text, turn = (text or "").strip(), state["turn"]
            if not text:
                return {notice: "⚠️ Write your answer in the box first."}
            if turn is None or turn["stage"] not in ("done", "failed"):
                return {notice: "⚠️ Your answer replaces A and B of the current message: send a message and "
                                "wait for its two answers first (or vote; the turn is then answered)."}
            app.store.add_demonstration(turn["prompt"], text, author=request.session_hash,
                                        comparison_id=turn["comparison_id"])
            resolve(state, text)
            return {session: state, conversation: list(state["history"]), better_box: "", **voting(False),
                    notice: "Thanks! Your answer was saved as a demonstration and continues the conversation."}

        def regenerate_pair(state: dict):
            turn = state["turn"]
            if turn is None or turn["stage"] == "resolved":
                return {notice: "⚠️ Nothing to regenerate: send a message first."}
            if turn["stage"] in ("queued", "streaming"):
                return {notice: "⚠️ Wait until both answers are complete."}
            state["turn"] = new_turn(turn["prompt"])  # the old pair stays in the store, unvoted
            return {session: state, **cleared()}

        def start_over(state: dict):
            state.clear()
            state.update(new_session())  # in place: a stream still running sees its turn is gone
            return {session: state, conversation: [], box: "", better_box: "", **cleared()}

        quiet = {"concurrency_limit": None, "show_progress": "hidden"}
        gr.on(triggers=[send.click, box.submit], fn=submit, inputs=[box, session], outputs=outputs, **quiet
              ).then(stream, [session], outputs, **quiet
              ).then(lambda: serving_line(app), None, serving, **quiet)
        regenerate.click(regenerate_pair, [session], outputs, **quiet).then(stream, [session], outputs, **quiet)
        for choice, button in buttons.items():
            button.click(vote_handler(choice), [session], outputs, **quiet)
        better_send.click(write_better, [better_box, session], outputs, **quiet)
        gr.on(triggers=[new_chat.click, conversation.clear], fn=start_over, inputs=[session], outputs=outputs,
              **quiet)  # the chatbot's own clear button starts over too
        gr.on(triggers=[tab.load, timer.tick], fn=lambda: serving_line(app), outputs=serving, **quiet)
    return tab


# -- operator tab ---------------------------------------------------------------------------------
def password_problem(app, password: str | None) -> str | None:
    """Why `password` does not open the console, or None when it does (checked on every action)."""
    expected = app.operator_password
    if expected is None:
        return (f"🔒 The operator console is locked: start the server with the environment variable "
                f"`{app.config.serve.operator_password_env}` set to a password.")
    if not hmac.compare_digest((password or "").encode(), expected.encode()):
        return "❌ Wrong password."
    return None


def short_time(timestamp: str | None) -> str:
    return (timestamp or "")[:19].replace("T", " ")


def number(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def tokens(value) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def gain_text(version: dict) -> str:
    """The gate's reward gain with its uncertainty, e.g. "+0.412 ± 0.120"."""
    gain, spread = plots.metric(version, "eval/reward_gain"), plots.metric(version, "eval/reward_gain_std")
    if gain is None:
        return ""
    return number(gain) if spread is None else f"{gain:+.3f} ± {spread:.3f}"


def versions_table(versions: list[dict]) -> pd.DataFrame:
    """Newest first, with the gate's own figures (the ones its reason quotes), then the reason."""
    columns = ["version", "parent", "status", "created", "reward model accuracy", "reward gain (gate)",
               "gain at equal length", "KL to base, nats", "answer tokens (was)", "win rate (reward model)", "why"]
    rows = [[v["id"], v.get("parent") or "", v["status"], short_time(v["created_at"]),
             number(plots.metric(v, "rm/accuracy")), gain_text(v), number(plots.metric(v, "eval/reward_gain_lc")),
             number(plots.metric(v, *plots.KL_KEYS)),
             f"{tokens(plots.metric(v, 'eval/candidate_length'))} ({tokens(plots.metric(v, 'eval/serving_length'))})"
             if plots.metric(v, "eval/candidate_length") is not None else "",
             number(plots.metric(v, "eval/win_rate")), v.get("reason") or ""]
            for v in reversed(versions)]
    return pd.DataFrame(rows, columns=columns)


def runs_table(runs: list[dict]) -> pd.DataFrame:
    columns = ["run", "status", "trigger", "started", "ended", "pairs", "candidate", "error"]
    rows = [[r["id"], r["status"], r["trigger"], short_time(r["started_at"]), short_time(r.get("ended_at")),
             "" if r.get("pairs") is None else r["pairs"], r.get("candidate_version") or "",
             (r.get("error") or "").strip().splitlines()[0] if (r.get("error") or "").strip() else ""]
            for r in runs]
    return pd.DataFrame(rows, columns=columns)


STAGES = {"loading": "loading the votes and the model", "reward": "training the reward model on the votes",
          "sft": "learning from written answers", "ppo": "PPO: the policy learns from the reward model",
          "gate": "the gate: new policy against the serving one on held-out prompts"}
PROGRESS_LABELS = {"rm/loss": "reward-model loss", "rm/batch_accuracy": "batch accuracy",
                   "objective/kl_coef": "KL coefficient β",
                   "rm/accuracy": "reward model held-out accuracy", "objective/score": "reward",
                   "objective/kl": "KL to base (nats)", "objective/length": "answer tokens", "ppo/loss": "PPO loss",
                   "ppo/approx_kl": "approx. KL per update", "ppo/clipfrac": "clipped share", "sft/loss": "SFT loss"}


def progress_text(runs: list[dict], now: datetime | None = None) -> str:
    """Stage, step bar, elapsed time and latest figures of the running run (runs newest first)."""
    running = next((r for r in runs if r["status"] == "running"), None)
    if running is None:
        if not runs:
            return "No training run yet."
        last = runs[0]
        return (f"No training run in progress. Last: run {last['id']} {last['status']} "
                f"at {short_time(last['ended_at'])}.")
    progress = running.get("progress") or {}
    stage = progress.get("stage", "starting")
    step, steps = progress.get("step"), progress.get("steps")
    line = (f"**Run {running['id']}** ({running['trigger']}, started {short_time(running['started_at'])}"
            f"{elapsed(running['started_at'], now)}) · **{STAGES.get(stage, stage)}**")
    if isinstance(step, (int, float)) and isinstance(steps, (int, float)) and steps > 1:
        filled = round(20 * min(step / steps, 1.0))
        line += f" · `{'█' * filled}{'░' * (20 - filled)}` step {step}/{steps}"
    values = [f"{PROGRESS_LABELS.get(key, key)} {value:.4g}" for key, value in progress.items()
              if key not in ("stage", "step", "steps", "updated_at") and isinstance(value, (int, float))]
    return line + ("\n\n" + " · ".join(values) if values else "")


def elapsed(started_at: str | None, now: datetime | None = None) -> str:
    """', 12 min ago' from an ISO timestamp; '' when it cannot be read."""
    try:
        started = datetime.fromisoformat(started_at)
    except (TypeError, ValueError):
        return ""
    now = now or datetime.now(started.tzinfo or timezone.utc)
    minutes = max((now - started).total_seconds(), 0) / 60
    return ", under a minute ago" if minutes < 1 else f", {minutes:.0f} min ago"


def schedule_text(app) -> str:
    if app.scheduler is None:
        return "The retrain scheduler is not running in this server."
    s = app.scheduler.schedule()
    state = "enabled" if s["enabled"] else "**paused**"
    return (f"Schedule {state}: every {s['retrain_every_minutes']:g} min when ≥ {s['min_new_votes']} new votes · "
            f"{s['new_votes']} new votes since the last run · next check {short_time(s['next_check_at']) or '—'} · "
            f"last check{' ' + short_time(s['last_check_at'])[11:16] if s.get('last_check_at') else ''}: "
            f"{s['last_decision']}")


def interval_text(low_high) -> str:
    return f"[{low_high[0]:.2f}, {low_high[1]:.2f}]" if low_high else ""


def canary_text(app) -> str:
    """The live A/B in words: the mode, the trial, its figures and what the votes say now."""
    if app.canary is None:
        return "Live A/B is not running in this server."
    s = app.canary.status()
    mode = ("**automatic**: the votes decide" if s["mode"] == "automatic" else
            "**by hand**: the votes advise, the operator decides")
    line = (f"Decisions {mode} · trials take {100 * s['share']:.0f}% of new comparisons · decided from "
            f"{s['min_votes']} votes, at most {s['max_votes']}")
    trial = s["trial"]
    if not trial:
        return line + "\n\nNo trial running: a version that passes the gate starts one."
    f = trial["figures"]
    what = (f"**{trial['candidate']}** (canary) against **{trial['incumbent']}** (serving)" if trial["phase"] == "canary"
            else f"**{trial['candidate']}** (promoted, serving) watched against its parent **{trial['incumbent']}**")
    figures = "no votes yet" if not f["comparisons"] else (
        f"{trial['candidate']} wins {f['win_rate']:.2f} {interval_text(f['win_rate_interval'])} of {f['comparisons']} "
        f"votes ({f['wins']} won, {f['losses']} lost, {f['ties']} tied)"
        + (f"; {f['length_controlled_win_rate']:.2f} {interval_text(f['length_controlled_interval'])} at equal length"
           if f.get("length_controlled_win_rate") is not None else ""))
    return f"{line}\n\n{what} since {short_time(trial['phase_started_at'])}: {figures}.\n\nThe votes say: " \
           f"**{trial['next_decision']}** ({trial['reason']})"


def leaderboard_table(rows: list[dict]) -> pd.DataFrame:
    """Versions rated from real cross-version votes (Bradley-Terry, Elo points), best first."""
    columns = ["version", "rating", "95% interval", "at equal length", "interval (equal length)", "votes",
               "against parent", "win rate vs parent"]
    def points(pair):
        return f"{pair[0]:.0f} – {pair[1]:.0f}" if pair else ""
    table = [[r["version"], f"{r['rating']:.0f}", points(r["interval"]), f"{r['rating_lc']:.0f}",
              points(r["interval_lc"]), r["votes"], r["parent"] or "",
              (f"{r['vs_parent']['win_rate']:.2f} {interval_text(r['vs_parent']['win_rate_interval'])} "
               f"of {r['vs_parent']['comparisons']}") if r["vs_parent"] else ""] for r in rows]
    return pd.DataFrame(table, columns=columns)


def write_export(app, directory: Path) -> str:
    """store.export_preferences() as JSONL in `directory` (replaced atomically); returns the path."""
    path = directory / "votes.jsonl"
    scratch = directory / f".votes-{threading.get_ident()}.tmp"
    with open(scratch, "w", encoding="utf-8") as out:
        for row in app.store.export_preferences():
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(scratch, path)
    return str(path)


def build_operator_tab(app) -> gr.Blocks:
    export_dir = Path(tempfile.mkdtemp(prefix="rlhf-export-"))
    with gr.Blocks() as tab:
        with gr.Row():
            password = gr.Textbox(label="Operator password", type="password", elem_id="op-password", scale=4)
            unlock = gr.Button("Unlock", elem_id="op-unlock", scale=1)
        op_message = gr.Markdown(elem_id="op-message")
        timer = gr.Timer(OPERATOR_REFRESH_S, active=False)
        drawn_for = gr.State(None)  # data the plots and tables were last drawn for
        schedule_shown = gr.State(None)  # the schedule values last written into the fields
        with gr.Column(visible=False, elem_id="op-console") as console:
            gr.Markdown("### Retrain schedule")
            with gr.Column(visible=app.scheduler is not None):  # a server started without one has no controls
                with gr.Row():
                    every = gr.Number(label="Check every N minutes", elem_id="op-every")
                    min_votes = gr.Number(label="Minimum new votes", precision=0, elem_id="op-min-votes")
                with gr.Row():
                    save = gr.Button("Save schedule", elem_id="op-save")
                    pause = gr.Button("Pause schedule", elem_id="op-pause")
                    run_now = gr.Button("Run now", variant="primary", elem_id="op-run-now")
            schedule_md = gr.Markdown(elem_id="op-schedule")
            op_action = gr.Markdown(elem_id="op-action")
            gr.Markdown("### Current training run")
            progress_md = gr.Markdown(elem_id="op-progress")
            gr.Markdown("### Learning")
            with gr.Row():
                votes_plot, accuracy_plot = gr.Plot(show_label=False), gr.Plot(show_label=False)
            with gr.Row():
                reward_plot, win_plot = gr.Plot(show_label=False), gr.Plot(show_label=False)
            gr.Markdown("### Policy versions")
            versions_df = gr.Dataframe(interactive=False, wrap=True, elem_id="op-versions",   # headers fit in words
                                       column_widths=["7%", "6%", "8%", "11%", "9%", "8%", "8%", "9%", "9%", "25%"])
            with gr.Row():
                version_pick = gr.Dropdown(["base"], value="base", label="Version", elem_id="op-version", scale=3)
                serve_button = gr.Button("Serve this version", elem_id="op-serve", scale=1)
                trial_button = gr.Button("A/B test it against the served one", elem_id="op-canary-start", scale=1)
            gr.Markdown("### Live A/B: versions judged by the voters")
            canary_md = gr.Markdown(elem_id="op-canary")
            leaderboard_df = gr.Dataframe(interactive=False, wrap=True, elem_id="op-leaderboard")
            with gr.Row():
                mode_button = gr.Button(BY_HAND, elem_id="op-canary-mode", scale=1)
                decision_pick = gr.Dropdown(["promote", "retire", "rollback", "confirm"], value="promote",
                                            label="Decision", elem_id="op-canary-decision", scale=2)
                decide_button = gr.Button("Decide now", elem_id="op-canary-decide", scale=1)
            gr.Markdown("### Training runs")
            runs_df = gr.Dataframe(interactive=False, wrap=True, elem_id="op-runs")
            export = gr.DownloadButton("Export votes (JSONL)", elem_id="op-export")

        def locked(problem: str) -> dict:
            return {op_message: problem, console: gr.Column(visible=False), timer: gr.Timer(active=False)}

        def schedule_fields(shown=None) -> dict:
            """The schedule line and the Pause/Resume label as the server has them (changes through the API or
            the CLI show up too); the number fields only when the server's values changed since they were
            written, so a refresh does not undo an operator's unsaved typing."""
            if app.scheduler is None:
                return {schedule_md: schedule_text(app)}
            s = app.scheduler.schedule()
            updates = {pause: gr.Button(PAUSE if s["enabled"] else RESUME), schedule_md: schedule_text(app)}
            values = [s["retrain_every_minutes"], s["min_new_votes"]]
            if values != shown:
                updates.update({every: values[0], min_votes: values[1], schedule_shown: values})
            return updates

        def live(drawn, shown) -> dict:
            """Cheap refresh for the timer; plots and the versions table only when their data changed."""
            runs, versions = app.store.runs(limit=50), app.store.versions()
            updates = {progress_md: progress_text(runs), runs_df: runs_table(runs), **schedule_fields(shown),
                       op_message: f"Unlocked. Serving **{app.serving_version()}**.", canary_md: canary_text(app)}
            if app.canary is not None:
                updates[mode_button] = gr.Button(BY_HAND if app.canary.state["auto"] else BY_VOTES)
            signature = [app.store.vote_counts()["total"], [(v["id"], v["status"]) for v in versions],
                         app.serving_version()]
            if signature != drawn:
                updates.update({drawn_for: signature, versions_df: versions_table(versions),
                                leaderboard_df: leaderboard_table(app.canary.leaderboard() if app.canary else []),
                                votes_plot: plots.votes_over_time(app.store.vote_times()),
                                accuracy_plot: plots.reward_model_accuracy(versions),
                                reward_plot: plots.reward_and_kl(versions), win_plot: plots.win_rate(versions),
                                version_pick: gr.Dropdown(choices=["base"] + [v["id"] for v in versions
                                                                              if v["status"] != "rejected"],
                                                          value=app.serving_version()),   # no accidental rollback
                                export: write_export(app, export_dir)})
            return updates

        def guarded(action):
            """Check the password server-side before every operator action."""
            def handler(password: str, *args):
                problem = password_problem(app, password)
                return locked(problem) if problem else action(*args)
            return handler

        def open_console():
            return {console: gr.Column(visible=True), timer: gr.Timer(active=True), **live(None, None)}

        def save_schedule(minutes, votes):
            if app.scheduler is None:
                return {op_action: schedule_text(app)}
            try:
                changes = {"retrain_every_minutes": float(minutes or 0), "min_new_votes": int(votes or 0)}
                app.scheduler.update_schedule(changes, actor="operator")
            except OperatorError as error:
                return {op_action: f"⚠️ {error}"}
            return {op_action: "Schedule saved.", **schedule_fields()}

        def pause_or_resume(label: str):
            """Does what the button said when it was clicked, whatever changed on the server meanwhile."""
            if app.scheduler is None:
                return {op_action: schedule_text(app)}
            resume = label == RESUME
            app.scheduler.update_schedule({"enabled": resume}, actor="operator")
            return {op_action: "Schedule resumed." if resume else "Schedule paused.", **schedule_fields()}

        def start_run(drawn, shown):
            if app.scheduler is None:
                return {op_action: schedule_text(app)}
            started, message = app.scheduler.run_now(actor="operator")
            return {op_action: ("▶️ " if started else "⚠️ Not started: ") + message, **live(drawn, shown)}

        def serve_picked(version, drawn, shown):
            try:
                pause_ms = serve_version(app, version or "base", actor="operator")
            except OperatorError as error:
                return {op_action: f"⚠️ {error}"}
            return {op_action: f"Now serving **{app.serving_version()}** (serving paused {pause_ms:.0f} ms).",
                    **live(drawn, shown)}

        def start_trial(version, drawn, shown):
            try:
                app.canary.begin_by_operator(version or "base", actor="operator")
            except OperatorError as error:
                return {op_action: f"⚠️ {error}"}
            return {op_action: f"A/B trial started: **{version}** against **{app.serving_version()}**.",
                    **live(drawn, shown)}

        def switch_mode(label: str):
            """Does what the button said when it was clicked."""
            app.canary.set_mode(auto=label == BY_VOTES, actor="operator")
            return {op_action: "The votes decide the trials." if label == BY_VOTES else
                    "Trials wait for your decision; the votes only advise.", **live(None, None)}

        def decide(decision, drawn, shown):
            try:
                verdict = app.canary.act(decision, actor="operator")
            except OperatorError as error:
                return {op_action: f"⚠️ {error}"}
            return {op_action: f"Decided: {verdict.action}. {verdict.reason}", **live(drawn, shown)}

        every_output = [op_message, console, timer, drawn_for, schedule_shown, every, min_votes, pause, schedule_md,
                        op_action, progress_md, votes_plot, accuracy_plot, reward_plot, win_plot, versions_df,
                        version_pick, runs_df, export, canary_md, leaderboard_df, mode_button]
        quiet = {"concurrency_limit": None, "show_progress": "hidden"}
        gr.on(triggers=[unlock.click, password.submit], fn=guarded(open_console), inputs=[password],
              outputs=every_output, **quiet)
        save.click(guarded(save_schedule), [password, every, min_votes], every_output, **quiet)
        pause.click(guarded(pause_or_resume), [password, pause], every_output, **quiet)
        run_now.click(guarded(start_run), [password, drawn_for, schedule_shown], every_output, **quiet)
        serve_button.click(guarded(serve_picked), [password, version_pick, drawn_for, schedule_shown], every_output,
                           **quiet)
        trial_button.click(guarded(start_trial), [password, version_pick, drawn_for, schedule_shown], every_output,
                           **quiet)
        mode_button.click(guarded(switch_mode), [password, mode_button], every_output, **quiet)
        decide_button.click(guarded(decide), [password, decision_pick, drawn_for, schedule_shown], every_output,
                            **quiet)
        timer.tick(guarded(live), [password, drawn_for, schedule_shown], every_output, **quiet)
    return tab


def build_ui(app) -> gr.Blocks:
    """Both tabs; mounted by server.create_web_app with THEME and CSS."""
    chat_tab, operator_tab = build_chat_tab(app), build_operator_tab(app)  # each built alone, then placed
    with gr.Blocks(title="Chat that learns from your votes") as demo:
        gr.Markdown("## Chat that learns from your votes\nEach message gets two answers; your vote teaches the "
                    "model which one people prefer. The app retrains itself on the votes.")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chat_tab.render()
            with gr.Tab("Operator", id="operator"):
                operator_tab.render()
    return demo
