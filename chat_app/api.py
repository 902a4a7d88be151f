"""HTTP API on the app's port: OpenAI-compatible chat, votes, public status, and the operator endpoints."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from chat_app.app import App
from chat_app.chat import ChatInputError, cast_vote, clean_messages, finish_pair, start_pair, with_system_prompt
from chat_app.engine import EngineBusy
from chat_app.limits import RequestLimits, client_of
from chat_app.metrics import register_metrics
from chat_app.status import public_status

log = logging.getLogger(__name__)
MAX_ID = 2**63 - 1   # SQLite's INTEGER: a larger id overflows in the driver


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   headers: dict | None = None):
    """An OpenAI-style error body: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


async def read_json(request: Request) -> dict:
    """The body as a JSON object; ApiError (400) for bad JSON, bad UTF-8, deep nesting or lone surrogates."""
    try:
        body = json.loads((await request.body() or b"null").decode("utf-8"))   # bytes: json guesses UTF-16/32 too
        # a "\ud800" escape parses to a string SQLite and the tokenizer cannot encode: refuse it here, once
        json.dumps(body, ensure_ascii=False).encode()
    except RecursionError:   # json recurses per nesting level: [[[[...]]]] deep enough overflows the stack
        raise ApiError(400, "the request body is nested too deeply")
    except ValueError as error:   # JSONDecodeError, UnicodeDecodeError/EncodeError, an integer of > 4300 digits
        raise ApiError(400, f"the request body is not valid JSON in UTF-8: {str(error)[:200]}")
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _number(body: dict, key: str, default, low: float, high: float, kind=float):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"{key} must be {'an integer' if kind is int else 'a number'}", key)
    if not low <= value <= high:
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        shown = shown if len(shown) <= 24 else f"an integer of {len(shown.lstrip('-'))} digits"
        raise ApiError(400, f"{key} must be between {low} and {high}, got {shown}", key)   # not 4,300 digits back
    return kind(value)


# OpenAI fields this server does not implement: ignoring one that is set would answer another question than asked
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "stop", "logprobs",
               "top_logprobs", "logit_bias", "audio", "modalities", "prediction")
UNSET = (None, False, [], {}, "none", "auto", {"type": "text"})   # what clients send to mean "not used"


def parse_completion_request(body: dict, app: App) -> dict:
    """Validated chat-completion arguments; ApiError (400) names what is wrong."""
    serve = app.config.serve
    for key in UNSUPPORTED:
        if body.get(key) not in UNSET:
            raise ApiError(400, f"{key} is not supported here: this server answers plain chat", key)
    try:
        messages = with_system_prompt(clean_messages(body.get("messages"), app.config.limits), serve.system_prompt)
    except ChatInputError as error:
        raise ApiError(400, str(error), "messages")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or n not in (1, 2):
        raise ApiError(400, f"n must be 1 or 2 (two answers make a comparison to vote on), got {n!r}"[:300], "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    max_tokens = serve.max_new_tokens if max_tokens is None else max_tokens
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", serve.max_new_tokens, 1,
                         serve.max_new_tokens_limit, int)
    return {"messages": messages, "n": n, "stream": stream, "max_new_tokens": max_tokens,
            "temperature": _number(body, "temperature", serve.temperature, 0.0, 2.0),
            "top_p": _number(body, "top_p", serve.top_p, 0.0, 1.0)}


def comparison_id_from(value) -> int:
    """Accept 17, "17" or "chatcmpl-17" (the completion id of an n=2 answer)."""
    if isinstance(value, bool):
        raise ApiError(400, "comparison_id must be an integer or a chatcmpl-N id", "comparison_id")
    if isinstance(value, str):
        text = value.removeprefix("chatcmpl-")
        if text.isascii() and text.isdigit() and len(text) <= 19:   # isdigit alone takes "²" and "١٧"
            value = int(text)
    if isinstance(value, int) and 0 <= value <= MAX_ID:
        return value
    raise ApiError(400, f"comparison_id must be an integer from 0 to 2^63-1 or a chatcmpl-N id, "
                        f"got {value!r}"[:300], "comparison_id")


def _usage(result) -> dict:
    completion = sum(result.completion_tokens)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion}


def _finish_reason(ended_with_eos: bool) -> str:
    return "stop" if ended_with_eos else "length"


def register_api(api: FastAPI, app: App) -> None:
    """Add every HTTP route; call before mounting Gradio at "/" (routes added after it answer 404)."""

    @api.exception_handler(ApiError)
    async def _api_error(_request, error: ApiError):
        return error_response(error.status, error.message, error.param, error.kind)

    @api.exception_handler(EngineBusy)
    async def _engine_busy(request: Request, error: EngineBusy):
        log.warning("refused %s %s %s: max_queued_requests (503)", client_of(request.scope), request.method,
                    request.url.path)   # the same line as chat_app.limits' refusals
        return error_response(503, str(error), kind="server_error", headers={"Retry-After": str(error.retry_after_s)})

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        """Still our error shape; the traceback goes to the log. A bug: tests/test_fuzz.py looks for these."""
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(error).__name__})", kind="server_error")

    @api.get("/v1/models")
    async def models():
        created = int(app.started_at)
        versions = ["base"] + [v["id"] for v in app.store.versions() if v["status"] in ("serving", "retired")]
        serving = app.serving_version()
        data = [{"id": serving, "object": "model", "created": created, "owned_by": "rlhf-chat"}]
        data += [{"id": v, "object": "model", "created": created, "owned_by": "rlhf-chat"}
                 for v in versions if v != serving]
        return {"object": "list", "data": data}

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        args = parse_completion_request(await read_json(request), app)
        created = int(time.time())
        comparison_id = None
        if args["n"] == 2:
            comparison_id, job = start_pair(app.store, app.engine, args["messages"], source="api",
                                            max_new_tokens=args["max_new_tokens"], temperature=args["temperature"],
                                            top_p=args["top_p"],
                                            versions=app.canary.versions_for_new_pair() if app.canary else None)
            completion_id = f"chatcmpl-{comparison_id}"
        else:
            job = app.engine.submit(args["messages"], n=1, max_new_tokens=args["max_new_tokens"],
                                    temperature=args["temperature"], top_p=args["top_p"])
            completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"

        def finished(result):
            if comparison_id is not None:
                finish_pair(app.store, comparison_id, result)

        def failed():
            if comparison_id is not None:
                app.store.delete_comparison(comparison_id)

        if not args["stream"]:
            try:
                result = await asyncio.to_thread(job.result)
            except Exception as error:   # a generation error, or no answer within the engine's timeout
                failed()
                return error_response(500, f"generation failed: {error or type(error).__name__}",
                                      kind="server_error")
            finished(result)
            choices = [{"index": i, "message": {"role": "assistant", "content": text},
                        "finish_reason": _finish_reason(eos), "logprobs": None}
                       for i, (text, eos) in enumerate(zip(result.texts, result.ended_with_eos))]
            body = {"id": completion_id, "object": "chat.completion", "created": created, "model": result.version,
                    "choices": choices, "usage": _usage(result)}
            if comparison_id is not None:
                body["comparison_id"] = comparison_id
            return body

        async def events():
            def chunk(model: str, choices: list[dict], **extra) -> str:
                body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": choices, **extra}
                if comparison_id is not None:
                    body["comparison_id"] = comparison_id
                return f"data: {json.dumps(body)}\n\n"

            model = app.serving_version()
            ended = False   # the stream reached its end (done or error); otherwise the client went away mid-stream
            try:
                yield chunk(model, [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                                    for i in range(args["n"])])
                while True:
                    try:
                        event = await asyncio.to_thread(job.events.get, timeout=600)
                    except Exception:
                        event = ("error", "no answer from the generation engine within 600 s")
                    if event[0] == "token":
                        yield chunk(model, [{"index": event[1], "delta": {"content": event[2]}, "finish_reason": None}])
                    elif event[0] == "error":
                        ended = True
                        failed()
                        yield f"data: {json.dumps({'error': {'message': event[1], 'type': 'server_error'}})}\n\n"
                        return
                    else:
                        ended, result = True, event[1]
                        finished(result)
                        yield chunk(result.version, [{"index": i, "delta": {}, "finish_reason": _finish_reason(eos)}
                                                     for i, eos in enumerate(result.ended_with_eos)],
                                    usage=_usage(result))
                        yield "data: [DONE]\n\n"
                        return
            finally:
                if not ended:   # a dropped stream: stop sampling for it (the in-flight cap freed its slot already)
                    app.engine.cancel(job)
                    failed()    # and forget its half-sampled comparison: nobody will see it to vote

        return StreamingResponse(events(), media_type="text/event-stream")

    @api.post("/v1/feedback")
    async def feedback(request: Request):
        body = await read_json(request)
        if "comparison_id" not in body:
            raise ApiError(400, "comparison_id is required", "comparison_id")
        comparison_id = comparison_id_from(body["comparison_id"])
        voter = body.get("voter")
        if voter is not None and (not isinstance(voter, str) or len(voter) > 200 or "\x00" in voter):
            raise ApiError(400, "voter must be a string of at most 200 characters (no NUL)", "voter")
        status, message = cast_vote(app.store, comparison_id, body.get("choice"), voter=voter or "api")
        code = {"ok": 200, "invalid": 400, "unknown": 404, "duplicate": 409, "incomplete": 409}[status]
        if code != 200:
            raise ApiError(code, message, "choice" if status == "invalid" else "comparison_id")
        return {"status": "ok", "comparison_id": comparison_id, "choice": body["choice"], "message": message}

    @api.get("/api/status")
    async def status():
        return public_status(app)

    @api.get("/healthz", response_class=PlainTextResponse)
    async def healthz():
        return "ok"

    # body size on every route, per-client limits on /v1 and /api; added first so the metrics count its refusals
    api.add_middleware(RequestLimits, limits=app.config.limits, refuse=error_response)
    register_metrics(api, app.metrics)   # GET /metrics, and the middleware that counts requests by route
    register_operator_api(api, app)

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]

    @api.api_route("/v1/{rest:path}", methods=methods, include_in_schema=False)
    @api.api_route("/api/{rest:path}", methods=methods, include_in_schema=False)
    async def unknown(request: Request, rest: str):
        """Our paths answer in our error shape; without this the Gradio mount at "/" says {"detail": "Not Found"}."""
        path = request.url.path
        allowed = sorted({m for route in api.routes if isinstance(route, APIRoute) and route.path == path
                          for m in route.methods} - {"HEAD"})
        if allowed:
            raise ApiError(405, f"{path} takes {' or '.join(allowed)}, not {request.method}")
        raise ApiError(404, f"no endpoint {path}; see /api/docs", kind="not_found_error")


def check_operator(app: App, request: Request) -> str:
    """The operator's name for the records; 401 without the right bearer token or with no password set."""
    password = app.operator_password
    if not password:
        raise ApiError(401, f"the operator console is locked: set {app.config.serve.operator_password_env} "
                            "and restart the server", kind="authentication_error")
    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), password.encode()):
        raise ApiError(401, "operator endpoints need 'Authorization: Bearer <OPERATOR_PASSWORD>'",
                       kind="authentication_error")
    return "operator"


def register_operator_api(api: FastAPI, app: App) -> None:
    from chat_app.scheduler import OperatorError, serve_version

    def scheduler():
        if app.scheduler is None:
            raise ApiError(503, "this server runs without a scheduler", kind="server_error")
        return app.scheduler

    @api.post("/api/operator/retrain")
    async def retrain(request: Request):
        actor = check_operator(app, request)
        started, message = scheduler().run_now(actor)
        return JSONResponse({"started": started, "message": message}, status_code=202 if started else 409)

    @api.post("/api/operator/serve")
    async def serve(request: Request):
        actor = check_operator(app, request)
        body = await read_json(request)
        version = body.get("version")
        if not isinstance(version, str) or not version:
            raise ApiError(400, "version is required (a version id, 'base' or 'latest')", "version")
        try:
            pause_ms = await asyncio.to_thread(serve_version, app, version, actor)
        except OperatorError as error:
            raise ApiError(error.status, str(error), "version")
        return {"serving_version": app.serving_version(), "pause_ms": round(pause_ms, 1)}

    @api.get("/api/operator/schedule")
    async def get_schedule(request: Request):
        check_operator(app, request)
        return scheduler().schedule()

    @api.put("/api/operator/schedule")
    async def put_schedule(request: Request):
        actor = check_operator(app, request)
        body = await read_json(request)
        try:
            return scheduler().update_schedule(body, actor)
        except OperatorError as error:
            raise ApiError(error.status, str(error))

    @api.get("/api/operator/runs")
    async def runs(request: Request):
        check_operator(app, request)
        return {"runs": app.store.runs()}

    @api.get("/api/operator/versions")
    async def versions(request: Request):
        check_operator(app, request)
        return {"serving_version": app.serving_version(), "versions": app.store.versions(),
                "events": app.store.serving_events()}

    @api.get("/api/operator/canary")
    async def get_canary(request: Request):
        check_operator(app, request)
        return {**app.canary.status(), "leaderboard": await asyncio.to_thread(app.canary.leaderboard)}

    @api.post("/api/operator/canary")
    async def canary_action(request: Request):
        """{"action": "start", "version": "v3"} puts a kept version in a trial; promote / retire (a canary) and
        rollback / confirm (a promoted version under watch) decide by hand, with the votes' figures recorded."""
        actor = check_operator(app, request)
        body = await read_json(request)
        action = body.get("action")
        actions = ("start", "promote", "retire", "rollback", "confirm")
        if action not in actions:
            raise ApiError(400, f"action must be one of {', '.join(actions)}", "action")
        try:
            if action == "start":
                return await asyncio.to_thread(app.canary.begin_by_operator, body.get("version"), actor)
            verdict = await asyncio.to_thread(app.canary.act, action, actor)
        except OperatorError as error:
            raise ApiError(error.status, str(error), "version" if action == "start" else "action")
        return {"action": verdict.action, "reason": verdict.reason, "serving_version": app.serving_version(),
                **app.canary.status()}

    @api.put("/api/operator/canary")
    async def put_canary(request: Request):
        """{"auto": false} lets the operator decide (the votes only advise); {"share": 0.5} changes the trial share."""
        actor = check_operator(app, request)
        body = await read_json(request)
        unknown = set(body) - {"auto", "share"}
        if unknown:
            raise ApiError(400, f"unknown canary setting {sorted(unknown)[0]!r}; use auto, share")
        auto, share = body.get("auto"), body.get("share")
        if auto is not None and not isinstance(auto, bool):
            raise ApiError(400, "auto must be true or false", "auto")
        if share is not None:
            share = _number(body, "share", None, 0.0, 1.0)
        return app.canary.set_mode(auto=auto, share=share, actor=actor)

    @api.get("/api/operator/export")
    async def export(request: Request):
        check_operator(app, request)
        lines = "".join(json.dumps(row) + "\n" for row in app.store.export_preferences())
        return PlainTextResponse(lines, media_type="application/jsonl",
                                 headers={"Content-Disposition": "attachment; filename=preferences.jsonl"})
