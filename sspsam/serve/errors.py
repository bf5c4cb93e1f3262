"""The service's one error shape: ``{"error": {"code", "message", "request_id"}}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(StarletteHTTPException):
    """An error the client caused or can act on; rendered as the JSON error body.

    An HTTPException so that one raised while FastAPI reads the body (the body limit and the
    upload deadline act inside ``receive``) reaches the app's handler as itself, not as FastAPI's
    generic "error parsing the body"."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status, message, headers or {})
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str, request_id: str | None, headers=None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "request_id": request_id}}
    return JSONResponse(body, status_code=status, headers=headers)
