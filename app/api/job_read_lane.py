"""``GET /v1/jobs/{id}`` answered before routing, as a pure ASGI middleware.

Clients poll this route (the SDK's ``wait``, CI pipelines, dashboards), so it is the one whose cost per request
sets the service's read capacity. Routed through FastAPI it spends about half its CPU in route matching and
dependency solving (profile in docs/BENCHMARKS.md). The lane serves the same route with the same parts and rules:
``deps.authenticate`` (key check, cache, rate limit), ``JobReader.body`` (ownership, 404) and ``ServiceError``'s JSON
errors. The FastAPI route (``routes.jobs.get_job``) stays the route's declaration (OpenAPI, and the path's other
methods: a HEAD or POST goes on to routing as before)."""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deps import authenticate, bearer_token
from app.services.errors import ServiceError

PREFIX = "/v1/jobs/"


class JobReadLane:
    def __init__(self, app: ASGIApp, route: object) -> None:
        self.app, self.route = app, route  # route: the FastAPI route it answers for (the metrics' route label)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "GET" or not path.startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        job_id = path[len(PREFIX):]
        if not job_id or "/" in job_id:  # /v1/jobs/{id}/events and the like: routed as usual
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        scope["route"] = self.route
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        try:
            who = await authenticate(state, bearer_token(None if authorization is None
                                                         else authorization.decode("latin-1")))
            response = Response(await state.job_reader.body(who, job_id), media_type="application/json")
        except ServiceError as exc:
            response = exc.response()
        await response(scope, receive, send)
