"""ProtocolError: the one exception type that crosses from codecs and engine admission to the wire."""
from __future__ import annotations

# OpenAI error "type" by HTTP status (the contract in RELIABILITY.md §3).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "overloaded_error",
    500: "server_error",
    503: "overloaded_error",
}


class ProtocolError(Exception):
    """A client-visible error: HTTP status, message, the offending field (param) and a type.

    The message must never hold a token, a path, a stack trace or an object repr.
    """

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.retry_after = retry_after

    def to_dict(self) -> dict:
        """The OpenAI error object: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.status}}

    def __repr__(self) -> str:
        return f"ProtocolError({self.status}, {self.message!r}, param={self.param!r})"


def bad_field(param: str, message: str) -> ProtocolError:
    return ProtocolError(f"{param}: {message}", status=400, param=param)
