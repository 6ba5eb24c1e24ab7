"""Per-key rate limits: one Limiter interface, an in-memory twin and Redis, and the failure policy."""
