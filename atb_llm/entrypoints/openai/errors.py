"""OpenAI-style JSON errors, and which HTTP status each kind of bad request gets.

400  the body is not JSON, not an object, misses a required field, or has a field of the wrong type
404  an unknown model (code "model_not_found") or route
400  a string with a lone UTF-16 surrogate (code "invalid_text"), an unsupported field (code
     "unsupported_parameter")
413  the prompt is over max_input_length, or prompt + max_tokens can never fit the KV cache
     (code "context_length_exceeded"); the body is larger than such a prompt could be (code
     "request_too_large")
422  a value out of range or unsupported: temperature < 0 or > 2, top_p outside (0, 1], n != 1,
     max_tokens < 1 or over max_output_length, an empty prompt, a chat request to a model
     without a chat template (code "invalid_value")
500  a bug, or a failure of the engine (for the requests in flight); the body says what failed
503  the server is shutting down (code "shutting_down")
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from atb_llm.entrypoints.openai.metrics import Metrics
from atb_llm.entrypoints.openai.protocol import ErrorDetail, ErrorResponse
from atb_llm.runtime.request_limits import short

log = logging.getLogger("atb_llm.server")

# pydantic error types that mean "well-formed, but the value is not allowed" (422); every other
# type (json_invalid, missing, string_type, ...) means the body itself is malformed (400).
VALUE_ERROR_TYPES = {
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "too_short",
    "too_long",
    "value_error",
    "literal_error",
    "finite_number",
}


# the `code` of errors raised by the framework (a body it could not read, an unknown route or method)
HTTP_CODES = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code)).model_dump()


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem of a body that failed validation, naming its field and value."""
    errors = exc.errors()
    status = 422 if all(e["type"] in VALUE_ERROR_TYPES for e in errors) else 400
    first = next((e for e in errors if (e["type"] in VALUE_ERROR_TYPES) == (status == 422)), errors[0])
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", first["msg"])
        return APIError(400, f"the body is not valid JSON: {detail}", code="invalid_json")
    path = [x for x in first["loc"] if x != "body"]
    if not path and first["type"] == "missing":
        return APIError(400, "the request has no body; send a JSON object", code="invalid_body")
    if not path:
        return APIError(400, f"the body must be a JSON object: {first['msg']}", code="invalid_body")
    field_path = [x for x in path if not _is_union_tag(x)]
    param = ".".join(str(x) for x in field_path)
    if first["type"] == "missing":
        return APIError(400, f"'{param}' is required", param, "missing_field")
    value = first.get("input")
    shown = f"{param}={short(value)}" if not isinstance(value, dict | list) else param
    if first["type"] == "unsupported":
        return APIError(400, f"{shown}: {first['msg']}", param, "unsupported_parameter")
    if first["type"] == "value_error":  # our validators' messages already name the value and the fix
        return APIError(422, f"{param}: {first['msg'].removeprefix('Value error, ')}", param, "invalid_value")
    if len(field_path) < len(path):  # a union: say which types would do
        tags = [str(e["loc"][len(field_path) + 1]) for e in errors if len(e["loc"]) > len(field_path) + 1]
        return APIError(status, f"{shown}: expected one of {', '.join(dict.fromkeys(tags))}", param, "invalid_type")
    return APIError(status, f"{shown}: {first['msg']}", param, "invalid_value" if status == 422 else "invalid_type")


def _is_union_tag(loc_item: int | str) -> bool:
    """pydantic names the member of a union that failed ("str", "list[int]") in the error location."""
    return isinstance(loc_item, str) and ("[" in loc_item or loc_item in ("str", "int", "float", "bool", "none"))


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def respond(err: APIError) -> JSONResponse:
        metrics.observe_error(err.status)
        return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 413:
            served = request.app.state.served
            message += f", over the limit of {served.encoder.max_body_bytes()} bytes (more than a prompt of "
            message += f"max_input_length={served.loop.engine.cfg.max_input_length} tokens needs); shorten it"
        return respond(APIError(exc.status_code, message, code=HTTP_CODES.get(exc.status_code, "http_error")))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return respond(
            APIError(500, f"internal error: {type(exc).__name__}: {short(str(exc), 200)}", code="internal_error")
        )
