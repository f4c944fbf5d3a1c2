"""The worker's error types and the ONE mapping from them to gRPC status codes."""

from __future__ import annotations

import grpc


class InferenceError(Exception):
    """An error the client caused or must know about; its message is safe to send back."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(InferenceError):
    """The request is malformed: datatype, shape, byte count, input names."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class TooLarge(InvalidInput):
    """The request can never be served as sent (more frames than the queue holds, more typed
    values than are decoded): retrying cannot help, so INVALID_ARGUMENT, not RESOURCE_EXHAUSTED."""


class ModelNotFound(InferenceError):
    """The request names a model or version this worker does not serve."""

    code = grpc.StatusCode.NOT_FOUND


class QueueFull(InferenceError):
    """The batcher's queue holds maxQueueSize frames already."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TooManyCalls(InferenceError):
    """The worker serves --max-concurrent-rpcs calls and streams already."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotReady(InferenceError):
    """The worker is still warming up, or draining after SIGTERM."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExpired(InferenceError):
    """The client's deadline passed before the request reached the model."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


INTERNAL_MESSAGE = "internal error in the inference worker (details are in the worker's log)"


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-visible message for any exception; never leaks a traceback."""
    if isinstance(exc, InferenceError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
