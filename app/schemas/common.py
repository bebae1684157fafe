from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, SecretStr

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
PATH_TEXT_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]+$"  # what _CONTROL allows, stated in the OpenAPI schema
TOKEN_PATTERN = r"^[!-~]+$"  # printable ASCII, no spaces: what a Hub access token is (and what an HTTP header holds)


def _hub_token(v: SecretStr) -> SecretStr:
    if not re.fullmatch(TOKEN_PATTERN, v.get_secret_value()):
        raise ValueError("must be a Hugging Face access token: printable ASCII without spaces")
    return v


def control_char_error(value: str) -> str | None:
    """Why ``value`` cannot be a path or model name (it holds a control character such as NUL), else None. The one
    rule for every path field: the schemas refuse with it, and app.services.models checks it again."""
    m = _CONTROL.search(value)
    return None if m is None else (f"contains the control character {m.group()!r} at position {m.start()}; paths "
                                   "and model names are plain text")


def _path_text(v: str) -> str:
    err = control_char_error(v)
    if err:
        raise ValueError(err)
    return v


# A path or model name field: control characters (NUL, newlines, ...) are a 422 naming the field.
PathText = Annotated[str, AfterValidator(_path_text)]

# A write-only Hub token field: ``hf_token: HubToken | None = Field(None, max_length=1000, json_schema_extra=...)``
HubToken = Annotated[SecretStr, AfterValidator(_hub_token)]


class ErrorOut(BaseModel):
    """Every error the API returns has this shape; ``detail`` says what went wrong and what to change."""

    detail: str | list[Any] = Field(description="What went wrong and what to do about it")
    code: str = Field(description="Machine-readable error code, e.g. not_moe, infeasible_budget, rate_limited")
    feasible: dict[str, Any] | None = Field(None, description="For infeasible_budget: the feasible budget range")
    quota: dict[str, Any] | None = Field(None, description="For storage_quota_exceeded: storage_quota_bytes, "
                                                           "stored_bytes, reserved_bytes and requested_bytes")


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "Malformed request (body is not valid JSON)",
        401: "Missing or invalid API key",
        403: "The API key lacks the scope this route needs",
        404: "No such job (or it belongs to another key)",
        409: "The job is not in a state that allows this",
        413: "Request body too large",
        422: "Invalid input; the message says what to change",
        429: "Rate or concurrency limit reached; retry after the Retry-After header's seconds",
        503: "A dependency (database, broker or the Hub) is unreachable; retry later",
    }
    # Errors are JSON even on routes whose success is another media type (the SSE stream, file downloads).
    json_body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
    return {c: {"model": ErrorOut, "description": text.get(c, "Error"), "content": json_body} for c in codes}


def document_errors(app: Any) -> None:
    """Make the OpenAPI document say what the app's handlers really answer on every ``/v1`` route: a 422 is always
    ``ErrorOut`` (not FastAPI's default HTTPValidationError), and 503 (database unavailable) can happen anywhere."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        ref = {"$ref": "#/components/schemas/ErrorOut"}
        for path, ops in schema.get("paths", {}).items():
            if not path.startswith("/v1/"):
                continue
            for op in ops.values():
                responses = op.setdefault("responses", {})
                for code in ("422", "503"):
                    if code == "422" and code not in responses:
                        continue
                    desc = responses.get(code, {}).get("description") or error_responses(int(code))[int(code)][
                        "description"]
                    responses[code] = {"description": desc, "content": {"application/json": {"schema": ref}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
