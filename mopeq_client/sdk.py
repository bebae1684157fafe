"""Python SDK of the MoPEQ service: :class:`MopeqClient` (sync) and :class:`AsyncMopeqClient` (asyncio), over httpx.

Never imports torch. Configuration: ``url`` / ``api_key`` arguments, else ``MOPEQ_URL`` / ``MOPEQ_API_KEY``
(``MOPEQ_MAX_RETRIES`` sets the retry count). Every error the service answers with is raised as a
:mod:`mopeq_client.errors` exception carrying the server's message.

Retries (tenacity): 429, 502, 503 and 504 answers and connection failures are retried with exponential backoff
and jitter, honouring ``Retry-After``. Events are read with httpx-sse. ``submit`` sends one ``Idempotency-Key`` (uuid4) per logical submit and reuses it on
its own retries, so a retried submit never makes two jobs.

::

    from mopeq_client import MopeqClient
    with MopeqClient("http://127.0.0.1:8000", api_key="...") as c:
        job = c.submit("org/model", avg_bits=3, quantizer="rtn")
        job = c.wait(job.id)                     # progress bar; follows the SSE stream
        print(job.status, c.bitmap(job.id)["avg_bits"])
        c.download(job.id, "out/")               # every file, SHA-256 checked, written atomically
"""

from mopeq_client._async_client import AsyncMopeqClient
from mopeq_client._core import (
    DEFAULT_URL,
    RETRY_STATUSES,
    STATUSES,
    TERMINAL,
    Artifact,
    Bitmap,
    Estimate,
    Event,
    Job,
    JobList,
    SSEDecoder,
    Watch,
    __version__,
    bitmap_rows,
    estimate_body,
    job_body,
    watch_body,
)
from mopeq_client._sync_client import MopeqClient
from mopeq_client.errors import parse_retry_after

__all__ = [
    "DEFAULT_URL", "RETRY_STATUSES", "STATUSES", "TERMINAL", "Artifact", "AsyncMopeqClient", "Bitmap", "Estimate",
    "Event", "Job", "JobList", "MopeqClient", "SSEDecoder", "Watch", "__version__", "bitmap_rows", "estimate_body",
    "job_body", "parse_retry_after", "watch_body",
]
