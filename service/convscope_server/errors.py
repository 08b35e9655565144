"""Domain errors and the one place where they become gRPC status codes.

Technique and repository code raises these; :class:`ErrorInterceptor` turns them into a status with the
message, logs anything unexpected as INTERNAL, and keeps the server serving.
"""

from __future__ import annotations

import difflib
import hmac
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


class Unavailable(ServiceError):
    """The server cannot run the call now (it is shutting down); a retry elsewhere or later may work."""

    code = grpc.StatusCode.UNAVAILABLE


class Malformed:
    """What a request deserializer gives for bytes that are not the request message (gRPC would otherwise
    answer INTERNAL and log a traceback before any interceptor runs)."""

    def __init__(self, message_type: str, reason: str):
        self.message = f"request: the {message_type} message could not be parsed ({reason})"


def _tolerant(deserializer):
    """``deserializer`` that returns :class:`Malformed` instead of raising."""
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    message_type = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - protobuf raises DecodeError, others anything
            return Malformed(message_type, str(error).rsplit(": ", 1)[-1] or type(error).__name__)
    return deserialize


def _checked(requests):
    """A request stream that raises INVALID_ARGUMENT at the first message that could not be parsed."""
    for request in requests:
        if isinstance(request, Malformed):
            raise InvalidArgument("request", request.message.split(": ", 1)[1])
        yield request


def _wrap(handler, wrap_unary, wrap_stream, deserializer=None):
    """``handler`` with its behaviour wrapped (``wrap_*(behaviour, stream_request)``) and the request
    deserializer replaced by ``deserializer(original)`` when given."""
    if handler is None:
        return None
    request = handler.request_deserializer if deserializer is None else deserializer(handler.request_deserializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary, False), request,
                                                   handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream, False), request,
                                                    handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary, True), request,
                                                    handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream, True), request,
                                                 handler.response_serializer)


def _log_call(method: str, start: float, code: grpc.StatusCode, message: str = "") -> None:
    log.info("%s %s %.1f ms%s", method, code.name, (time.perf_counter() - start) * 1e3,
             f" ({message})" if message else "")


def _ended_code(context) -> grpc.StatusCode:
    """Why a call that is no longer active ended: its deadline passed, or the client cancelled it."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
        else grpc.StatusCode.CANCELLED


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps :class:`ServiceError` to its status, unexpected exceptions to INTERNAL; logs every call.

    Request bodies that do not parse are answered INVALID_ARGUMENT (a :class:`Malformed` request), and calls
    the client cancelled (or whose deadline passed) are logged CANCELLED (DEADLINE_EXCEEDED), not OK.
    Methods in ``light_methods`` run on ``light_pool`` (gRPC's per-behaviour thread pool), so they never wait
    for a request thread held by a heavy job. ``prepare()``, when given, runs on the request thread before
    each call (the server uses it to name its job gate)."""

    def __init__(self, light_pool=None, light_methods=frozenset(), prepare=None):
        self._light_pool, self._light_methods = light_pool, light_methods
        self._prepare = prepare or (lambda: None)

    def intercept_service(self, continuation, details):
        method = details.method
        pool = self._light_pool if method in self._light_methods else None

        def on_pool(behaviour):
            if pool is not None:
                behaviour.experimental_thread_pool = pool
            return behaviour

        def finish(context, start, code, message=""):
            if code is grpc.StatusCode.OK and not context.is_active():
                code = _ended_code(context)
            _log_call(method, start, code, message)
            if code is not grpc.StatusCode.OK and context.is_active():
                context.abort(code, message)

        def failure(error):
            if isinstance(error, ServiceError):
                return error.code, str(error)
            if isinstance(error, grpc.RpcError):  # reading a request stream the client has cancelled
                return grpc.StatusCode.CANCELLED, "the client cancelled the call"
            log.exception("unexpected error in %s", method)
            return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"

        def wrap_unary(behaviour, stream_request):
            def unary(request, context):
                start = time.perf_counter()
                self._prepare()
                if stream_request:
                    request = _checked(request)
                elif isinstance(request, Malformed):
                    finish(context, start, grpc.StatusCode.INVALID_ARGUMENT, request.message)
                    return None
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
            return on_pool(unary)

        def wrap_stream(behaviour, stream_request):
            def stream(request, context):
                start = time.perf_counter()
                self._prepare()
                if stream_request:
                    request = _checked(request)
                elif isinstance(request, Malformed):
                    finish(context, start, grpc.StatusCode.INVALID_ARGUMENT, request.message)
                    return None
                try:
                    yield from behaviour(request, context)
                except GeneratorExit:  # gRPC closed the response stream: the client went away
                    _log_call(method, start, _ended_code(context))
                    raise
                except ServiceError as error:
                    finish(context, start, *failure(error))
                except Exception as error:  # noqa: BLE001
                    if context.code() is not None:
                        raise
                    finish(context, start, *failure(error))
                else:
                    finish(context, start, grpc.StatusCode.OK)
            return on_pool(stream)

        return _wrap(continuation(details), wrap_unary, wrap_stream, _tolerant)


class TokenInterceptor(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every call except health checks. It runs before
    everything else: a refused call's body is never parsed and nothing but the refusal is logged."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}"

    def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization")
        if given is not None and hmac.compare_digest(given.encode(), self._expected.encode()):
            return continuation(details)
        reason = "missing authorization metadata" if given is None else "invalid token"
        method = details.method

        def deny(request, context):
            _log_call(method, time.perf_counter(), grpc.StatusCode.UNAUTHENTICATED, reason)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"authorization: {reason}")

        # The body is not parsed (the identity deserializer): unauthenticated bytes get no parser.
        handler = continuation(details) or grpc.stream_stream_rpc_method_handler(deny)
        return _wrap(handler, lambda *_: deny, lambda *_: deny, lambda _: (lambda data: data))
