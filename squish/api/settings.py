"""Server settings (filled from ``squish serve`` options and environment)."""

from __future__ import annotations

from dataclasses import dataclass, field

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allow_unauthenticated_remote: bool = False
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 1 << 20
    max_messages: int = 1024
    max_content_chars: int = 500_000
    max_tokens: int = 4096
    rate_limit_per_minute: int = 120
    rate_limit_burst: int = 30
    request_timeout: float = 300.0
    queue_timeout: float = 60.0
    max_batch: int = 8
    max_queue: int = 64
    prefix_cache_mb: int | None = None  # None: scaled to the model (runtime.prompt_cache.auto_max_bytes)
    kv_bits: int | None = None  # None: the model's own KV cache; 8 / 4: quantized (runtime.kv_cache)
    responses_store: int = 1000  # stored OpenAI Responses (store: true), at most this many ...
    responses_store_mb: int = 64  # ... and this many MiB of JSON; least recently used out; in memory only

    def check(self) -> None:
        """Raise ValueError for unsafe or impossible settings."""
        if self.host not in LOOPBACK and not self.api_key and not self.allow_unauthenticated_remote:
            raise ValueError(
                f"refusing to listen on {self.host} without an API key: anyone who can reach this "
                "machine could use it. Set --api-key (or SQUISH_API_KEY), or pass "
                "--insecure-no-auth if the network is trusted."
            )
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        for name in ("max_body_bytes", "max_messages", "max_content_chars", "max_tokens",
                     "max_batch", "request_timeout", "queue_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.max_queue < 0 or (self.prefix_cache_mb or 0) < 0 or self.rate_limit_per_minute < 0:
            raise ValueError("--max-queue, --prefix-cache-mb and --rate-limit must not be negative")
        if self.responses_store < 0 or self.responses_store_mb < 0:
            raise ValueError("--responses-store and --responses-store-mb must not be negative")
