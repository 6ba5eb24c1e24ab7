"""Usage records: one per request, queued off the hot path, written in batches, spooled when the store is down."""
