"""Exceptions raised by the client. Each carries the gRPC status code and the server's message."""

from __future__ import annotations

import grpc


class ConvscopeError(Exception):
    """A call to the convscope server failed."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(ConvscopeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ConvscopeError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ConvscopeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ConvscopeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(ConvscopeError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Unauthenticated(ConvscopeError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(ConvscopeError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ConvscopeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ConvscopeError):
    code = grpc.StatusCode.CANCELLED


class Internal(ConvscopeError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, ResourceExhausted, FailedPrecondition,
                                      AlreadyExists, Unauthenticated, Unavailable, DeadlineExceeded, Cancelled,
                                      Internal)}


def from_rpc_error(error: grpc.RpcError) -> ConvscopeError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    return _BY_CODE.get(code, ConvscopeError)(message or code.name, code)
