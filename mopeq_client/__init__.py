"""MoPEQ client: the Python SDK (:class:`MopeqClient`, :class:`AsyncMopeqClient`) and the remote ``mopeq`` commands.

Needs only httpx (plus typer and rich for the CLI); never imports torch."""

from mopeq_client.errors import (
    AuthenticationError,
    ChecksumError,
    ConflictError,
    MopeqAPIError,
    MopeqError,
    NotFoundError,
    RateLimitError,
    ServerError,
    ServiceUnreachableError,
    StreamError,
    ValidationError,
    WaitTimeoutError,
)
from mopeq_client.sdk import (
    Artifact,
    AsyncMopeqClient,
    Bitmap,
    Estimate,
    Event,
    Job,
    JobList,
    MopeqClient,
    Watch,
    __version__,
)

__all__ = [
    "Artifact", "AsyncMopeqClient", "AuthenticationError", "Bitmap", "ChecksumError", "ConflictError", "Estimate",
    "Event", "Job", "JobList", "MopeqAPIError", "MopeqClient", "MopeqError", "NotFoundError", "RateLimitError",
    "ServerError", "ServiceUnreachableError", "StreamError", "ValidationError", "WaitTimeoutError", "Watch",
    "__version__",
]
