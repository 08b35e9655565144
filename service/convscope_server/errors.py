"""Domain errors and the one place where they become gRPC status codes.

Technique and repository code raises these; :class:`ErrorInterceptor` turns them into a status with the
message, logs anything unexpected as INTERNAL, and keeps the server serving.
"""

from __future__ import annotations

import difflib
import logging
import time

import grpc

log = logging.getLogger("convscope_server")


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    """A malformed request: names the field and the reason."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, field: str, kind: str, name: str, known=()):
        close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        super().__init__(f"{field}: unknown {kind} {name!r}{hint}")
        self.field = field


class ResourceExhausted(ServiceError):
    """A request over a configured limit (image size, batch, forward passes, steps)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServiceError):
    """The request is well formed but the model cannot serve it (failed to load, no gradient path)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(ServiceError):
    """Creating something (a gallery) that exists, without asking to replace it."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


def _wrap(handler, wrap_unary, wrap_stream):
    if handler is None:
        return None
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), handler.request_deserializer,
                                                   handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream),
                                                    handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary),
                                                    handler.request_deserializer, handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream),
                                                 handler.request_deserializer, handler.response_serializer)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps :class:`ServiceError` to its status, unexpected exceptions to INTERNAL; logs every call."""

    def intercept_service(self, continuation, details):
        method = details.method

        def finish(context, start, code, message=""):
            log.info("%s %s %.1f ms%s", method, code.name, (time.perf_counter() - start) * 1e3,
                     f" ({message})" if message else "")
            if code is not grpc.StatusCode.OK:
                context.abort(code, message)

        def failure(error):
            if isinstance(error, ServiceError):
                return error.code, str(error)
            if isinstance(error, grpc.RpcError):  # reading a request stream the client has cancelled
                return grpc.StatusCode.CANCELLED, "the client cancelled the call"
            log.exception("unexpected error in %s", method)
            return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"

        def wrap_unary(behaviour):
            def unary(request, context):
                start = time.perf_counter()
                try:
                    response = behaviour(request, context)
                except ServiceError as error:
                    finish(context, start, *failure(error))
                except Exception as error:  # noqa: BLE001 - anything else is a bug: report, keep serving
                    if context.code() is not None:  # already aborted by the handler itself
                        raise
                    finish(context, start, *failure(error))
                else:
                    finish(context, start, grpc.StatusCode.OK)
                    return response
            return unary

        def wrap_stream(behaviour):
            def stream(request, context):
                start = time.perf_counter()
                try:
                    yield from behaviour(request, context)
                except ServiceError as error:
                    finish(context, start, *failure(error))
                except Exception as error:  # noqa: BLE001
                    if context.code() is not None:
                        raise
                    finish(context, start, *failure(error))
                else:
                    finish(context, start, grpc.StatusCode.OK)
            return stream

        return _wrap(continuation(details), wrap_unary, wrap_stream)


class TokenInterceptor(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every call except health checks."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}"

    def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization")
        if given == self._expected:
            return continuation(details)
        reason = "missing authorization metadata" if given is None else "invalid token"

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"authorization: {reason}")

        handler = continuation(details)
        return _wrap(handler, lambda _: deny, lambda _: deny)
