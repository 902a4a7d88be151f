"""The web server: FastAPI routes first, then the Gradio UI mounted at "/"."""
from __future__ import annotations

import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network here, and no phoning home

from fastapi import FastAPI

from chat_app.api import register_api
from chat_app.app import App

log = logging.getLogger(__name__)


def create_web_app(app: App, with_ui: bool = True) -> FastAPI:
    api = FastAPI(title="rlhf-chat", docs_url="/api/docs", openapi_url="/api/openapi.json")
    register_api(api, app)  # before the mount: routes added after a mount at "/" answer 404
    if not with_ui:
        return api
    import gradio as gr

    from chat_app.ui import CSS, THEME, build_ui

    return gr.mount_gradio_app(api, build_ui(app), path="/", theme=THEME, css=CSS)


def serve(app: App, with_ui: bool = True) -> None:
    import uvicorn

    host, port = app.config.serve.host, app.config.serve.port
    if not app.operator_password:
        log.warning("the operator console is locked: set %s=<password> before starting to unlock it",
                    app.config.serve.operator_password_env)
    log.info("serving %s on http://%s:%d (API: /v1/chat/completions, /v1/feedback, /api/status)",
             app.serving_version(), host, port)
    if app.scheduler is not None:
        s = app.scheduler.settings
        log.info("retraining %s: a check every %g min starts a run when >= %d new votes",
                 "scheduled" if s["enabled"] else "PAUSED (resume it from the operator console)",
                 s["retrain_every_minutes"], s["min_new_votes"])
    try:
        uvicorn.run(create_web_app(app, with_ui), host=host, port=port, log_level="warning")
    finally:
        app.close()
        log.info("stopped: the engine, the scheduler and the database are closed")
