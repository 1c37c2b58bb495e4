"""The API's limits and credentials, until the config package provides them.

A frozen dataclass so the app is built from one immutable value: nothing in the HTTP
layer can change a limit at run time behind the operator's back.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ApiSettings:
    max_request_bytes: int = 1 << 20  # larger bodies get 413 before they are parsed
    max_new_tokens_limit: int = 1024  # requests asking for more get 400
    default_max_new_tokens: int = 16  # when a request does not say
    api_tokens: frozenset[str] = frozenset()  # needed on every route but /health; empty = open
    rate_limit_per_s: float = 0.0  # requests per second per client; 0 = no limit
    rate_limit_burst: int = 20  # requests a client may send at once before the rate applies
    max_wait_s: float = 300.0  # longest a request may wait for its result on one call
    retry_after_s: int = 1  # Retry-After sent with 429 and 503
    serve_metrics: bool = True  # metrics.enabled: GET /metrics, else 404
    metrics_public: bool = False  # with tokens set, GET /metrics needs none
    max_prompt_bytes: int = 0  # prompt text over this gets 413 untokenized; 0 = derived
    stream_verified_only: bool = False  # streams hold text until the result is checked
    # api.host: bound to a loopback address, the API answers only to loopback Host names,
    # this and `allowed_hosts` (api.guards.SameOrigin); the default is api.host's
    host: str = "127.0.0.1"
    allowed_hosts: frozenset[str] = frozenset()  # api.allowed_hosts

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_new_tokens_limit", "default_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"ApiSettings.{name} must be at least 1")
        if self.rate_limit_per_s < 0 or self.rate_limit_burst < 1:
            raise ValueError("ApiSettings: rate_limit_per_s must be >= 0 and burst >= 1")
        if self.max_prompt_bytes < 0:
            raise ValueError("ApiSettings.max_prompt_bytes must be >= 0 (0 = derived)")
        if self.max_wait_s < 0:
            raise ValueError("ApiSettings.max_wait_s must be >= 0")


__all__ = ["ApiSettings"]
