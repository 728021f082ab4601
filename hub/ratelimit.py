"""Rate limits shared by every worker (buckets live in the broker)."""

from __future__ import annotations

import math

from .broker import Broker
from .http_errors import RateLimitExceeded


async def enforce(broker: Broker, key: str, *, rate: float, burst: int) -> dict[str, str]:
    """Take one token from ``key``'s bucket; return ``X-RateLimit-*`` headers, or raise
    :class:`RateLimitExceeded` (429 with ``Retry-After``)."""
    result = await broker.rate_limit(key, rate=rate, burst=burst)
    headers = {
        "X-RateLimit-Limit": str(result.limit),
        "X-RateLimit-Remaining": str(result.remaining),
        "X-RateLimit-Reset": str(math.ceil(result.reset_after)),
    }
    if not result.allowed:
        retry = max(1, math.ceil(result.retry_after))
        headers["Retry-After"] = str(retry)
        raise RateLimitExceeded(f"rate limit exceeded, retry in {retry} s", headers)
    return headers
