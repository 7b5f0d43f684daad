"""The auth middleware on real FastAPI and Starlette apps, reporting to a loopback ingest server."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.testclient import TestClient
from mcp_metrics import (
    AuthMetricsMiddleware,
    AuthOutcome,
    MetricsClient,
    add_auth_metrics_middleware,
    hash_value,
    report_auth_outcome,
)
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from .conftest import API_KEY, IngestServer

JWT = "Bearer aaa.bbb.ccc"


def auth_app() -> FastAPI:
    app = FastAPI()

    @app.get("/validate")
    async def validate(request: Request) -> dict[str, Any]:
        if "authorization" not in request.headers:
            raise HTTPException(401, "no credentials")
        if request.headers.get("x-user") == "mallory":
            # The status code says OK, but the token was for the wrong audience.
            report_auth_outcome(request, success=False, user_id="mallory")
            return {"ok": True}
        report_auth_outcome(request, user_id=request.headers.get("x-user"))
        return {"ok": True}

    @app.get("/oauth/{provider}/callback")
    def callback(provider: str) -> dict[str, str]:
        return {"provider": provider}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("auth backend exploded")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def env_for(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("METRICS_SERVICE_URL", url)
    monkeypatch.setenv("METRICS_API_KEY", API_KEY)
    monkeypatch.setenv("METRICS_CLIENT_FLUSH_INTERVAL_S", "60")  # only the shutdown flush delivers


def test_one_line_on_fastapi(ingest: IngestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    env_for(monkeypatch, ingest.url)
    app = auth_app()
    client = add_auth_metrics_middleware(
        app,
        service_name="mw-auth",
        auth_routes=["/validate", "/oauth/{provider}/callback", "/boom"],
    )
    with TestClient(app, raise_server_exceptions=False) as http:
        assert http.get("/validate", headers={"Authorization": JWT, "X-User": "alice"}).json()
        assert http.get("/validate").status_code == 401
        assert http.get("/validate", headers={"Authorization": JWT, "X-User": "mallory"}).json()
        assert http.get("/oauth/github/callback", headers={"Authorization": "Bearer opaque"}).json()
        assert http.get("/boom").status_code == 500
        assert http.get("/health").json() == {"status": "ok"}
        assert ingest.requests == []  # nothing sent on the request path
    # Lifespan shutdown flushed the queue.
    assert client.stats().sent == 5
    events = ingest.accepted
    assert {e["type"] for e in events} == {"auth_request"}
    dims = [e["dimensions"] for e in events]
    assert [(d["route"], d["success"], d["method"], d["status_code"]) for d in dims] == [
        ("/validate", True, "jwt", 200),
        ("/validate", False, "noauth", 401),
        ("/validate", False, "jwt", 200),
        ("/oauth/{provider}/callback", True, "oauth", 200),
        ("/boom", False, "noauth", 500),
    ]
    assert dims[0]["user_hash"] == hash_value("alice")
    assert dims[2]["user_hash"] == hash_value("mallory")
    assert all(d["server"] == "mw-auth" for d in dims)
    assert all(e["duration_ms"] >= 0 for e in events)
    sent_text = json.dumps([r.body for r in ingest.requests])
    assert "alice" not in sent_text and "mallory" not in sent_text and "github" not in sent_text
    assert ingest.requests[0].body["service"] == "mw-auth"


def test_outcome_hook_and_server_from_the_route(ingest: IngestServer) -> None:
    async def login(request: Any) -> JSONResponse:
        ok = request.headers.get("x-password") == "right"
        return JSONResponse({"ok": ok}, headers={"x-auth-result": "ok" if ok else "denied"})

    app = Starlette(routes=[Route("/servers/{server}/login", login, methods=["POST"])])
    metrics = MetricsClient(url=ingest.url, api_key=API_KEY, service="mw-auth")
    app.add_middleware(
        AuthMetricsMiddleware,
        client=metrics,
        owns_client=True,
        auth_routes=["/servers/{server}/login"],
        auth_method="oauth",
        server=lambda req: req.path_params["server"],
        outcome=lambda req: AuthOutcome(
            success=req.response_headers.get("x-auth-result") == "ok",
            user_id=req.scope["headers"][0][1].decode() if req.scope["headers"] else None,
        ),
    )
    with TestClient(app) as http:
        assert http.post("/servers/weather/login", headers={"X-Password": "right"}).json()["ok"]
        assert not http.post("/servers/files/login", headers={"X-Password": "wrong"}).json()["ok"]
    dims = [e["dimensions"] for e in ingest.accepted]
    assert [(d["server"], d["success"], d["method"]) for d in dims] == [
        ("weather", True, "oauth"),
        ("files", False, "oauth"),
    ]
    assert all(d["route"] == "/servers/{server}/login" for d in dims)
    assert all(len(d["user_hash"]) == 16 for d in dims)


def test_host_keeps_serving_when_the_service_is_down(
    down_ingest: IngestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_for(monkeypatch, down_ingest.url)
    monkeypatch.setenv("METRICS_CLIENT_SHUTDOWN_TIMEOUT_S", "0.3")
    monkeypatch.setenv("METRICS_CLIENT_MAX_QUEUE_SIZE", "20")
    app = auth_app()
    client = add_auth_metrics_middleware(app, service_name="mw-auth", auth_routes=["/validate"])
    with TestClient(app) as http:
        for _ in range(50):
            assert http.get("/validate", headers={"Authorization": JWT}).status_code == 200
    stats = client.stats()
    assert stats.recorded == 50
    assert stats.dropped_overflow == 30
    assert stats.dropped_shutdown == 20


def test_plain_asgi_app_and_non_http_scopes_pass_through(ingest: IngestServer) -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await send({"type": "http.response.start", "status": 403, "headers": []})
        await send({"type": "http.response.body", "body": b"no"})

    metrics = MetricsClient(url=ingest.url, api_key=API_KEY, service="mw-auth")
    wrapped = AuthMetricsMiddleware(app, client=metrics, auth_routes=["/token"])
    with TestClient(wrapped) as http:  # type: ignore[arg-type]
        assert http.post("/token/").status_code == 403
        assert http.post("/other").status_code == 403
    assert seen == ["lifespan", "http", "http"]
    anyio.run(metrics.aclose)  # a client passed in is the caller's to close
    [event] = ingest.accepted
    assert event["dimensions"]["route"] == "/token"
    assert event["dimensions"]["success"] is False


def test_add_to_a_non_starlette_app_is_refused() -> None:
    with pytest.raises(TypeError, match="AuthMetricsMiddleware"):
        add_auth_metrics_middleware(object(), service_name="x")
