"""One error shape for every failure: RFC 9457 problem details (`application/problem+json`).

Our own errors are `Problem` exceptions, or the contract's image errors (mapped in `IMAGE_PROBLEMS`); FastAPI's
validation errors and Starlette's HTTP errors (404, 405, ...) are rendered in the same shape by the handlers
installed here. Anything unexpected is answered with `internal_error()` by app/middleware.py's
RequestContextMiddleware, which knows the request id: an exception handler for `Exception` would run in
Starlette's ServerErrorMiddleware, outside our middlewares, which re-raises after answering, so that uvicorn
closes the connection.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract.images import CorruptImage, ImageError, NotAnImage, TooManyPixels

PROBLEM_MEDIA_TYPE = "application/problem+json"
_TYPE_PREFIX = "urn:siamcam:problem:"
# nginx's status for a request whose client went away before the answer; HTTPStatus does not know it.
CLIENT_CLOSED_REQUEST = 499
_TITLES = {CLIENT_CLOSED_REQUEST: "Client Closed Request"}


class Problem(StarletteHTTPException):
    """An error the client can act on: `slug` names its kind (the problem type), `detail` says what to do.

    An HTTPException, so that FastAPI lets it through when it is raised while the body is being parsed.
    """

    def __init__(self, status: int, slug: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, detail, headers)
        self.slug = slug

    def response(self) -> JSONResponse:
        return problem_response(self.status_code, self.slug, self.detail, dict(self.headers or {}))


def problem_body(status: int, slug: str, detail: str) -> dict[str, object]:
    return {
        "type": _TYPE_PREFIX + slug,
        "title": _TITLES.get(status) or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }


def problem_response(status: int, slug: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        problem_body(status, slug, detail), status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE
    )


def service_unavailable(detail: str, retry_after_s: int) -> Problem:
    return Problem(503, "service-unavailable", detail, {"Retry-After": str(retry_after_s)})


async def _on_problem(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, Problem)
    return error.response()


# Each kind of image the contract refuses: its status and problem type.
IMAGE_PROBLEMS: dict[type[ImageError], tuple[int, str]] = {
    NotAnImage: (415, "not-an-image"),
    CorruptImage: (422, "corrupt-image"),
    TooManyPixels: (422, "image-too-large"),
}


async def _on_image_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ImageError)
    status, slug = IMAGE_PROBLEMS[type(error)]
    return problem_response(status, slug, str(error))


async def _on_http_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    slug = HTTPStatus(error.status_code).phrase.lower().replace(" ", "-")
    detail = error.detail if isinstance(error.detail, str) else HTTPStatus(error.status_code).description
    if error.status_code == 404:
        detail = "There is nothing at this path: see /docs for the endpoints."
    return problem_response(error.status_code, slug, detail, dict(error.headers or {}))


def _takes_a_form(request: Request) -> bool:
    """Whether the endpoint of `request` reads a multipart form (File and Form parameters)."""
    route = request.scope.get("route")
    body = getattr(route, "body_field", None)
    return body is not None and isinstance(body.field_info, params.Form)


async def _on_validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if _takes_a_form(request) and media_type != "multipart/form-data":
        # Not a form with missing fields but no form at all (JSON, urlencoded, nothing): say what to send.
        sent = f"a body of Content-Type {media_type}" if media_type else "no Content-Type"
        return problem_response(400, "bad-request", f"The request has {sent}; send the images as multipart/form-data "
                                "fields (e.g. curl -F image1=@a.jpg -F image2=@b.jpg). See /docs for each endpoint's "
                                "fields.")
    # One readable sentence per error, e.g. "body.image2: Field required".
    reasons = [
        f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors()
    ]
    detail = "The request is not valid: " + "; ".join(reasons) + ". See /docs for the expected form."
    return problem_response(422, "invalid-request", detail)


def internal_error(request_id: str) -> Problem:
    return Problem(500, "internal-error", f"The service failed on this request; it has been logged with request "
                   f"id {request_id}: retry, and quote that id if it fails again.")


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(ImageError, _on_image_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
