"""One request/response exchange: what the client asked, what the stages decided, how far it got."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.http.upstream import UpstreamConnection
    from gateway.keys.cache import CachedKey
    from gateway.routing import Route

BODY_NONE = 0
BODY_LENGTH = 1
BODY_CHUNKED = 2


class Exchange:
    """Mutable per-request state; slots keep it small and allocation cheap."""

    __slots__ = (
        "began",
        "body_chunks",
        "body_complete",
        "body_kind",
        "body_received",
        "buffered",
        "bytes_out",
        "client_ip",
        "content_length",
        "credential_header",
        "discarding",
        "done",
        "error_code",
        "expect_continue",
        "has_connection_header",
        "headers",
        "host",
        "host_count",
        "host_raw",
        "keep_alive",
        "key_prefix",
        "method",
        "path",
        "principal",
        "query",
        "request_id",
        "response_extra",
        "response_started",
        "retried",
        "route",
        "started",
        "status",
        "target",
        "upgrade",
        "upstream",
        "upstream_ended",
        "upstream_extra",
        "upstream_started",
        "upstream_status",
        "version",
        "xff",
    )

    def __init__(self, started: float, began: float) -> None:
        self.started = started  # loop time, for deadlines
        self.began = began  # perf_counter(), for latencies: uvloop's loop time moves in whole milliseconds
        self.method = ""
        self.version = b"1.1"
        self.target = b""
        self.path = b""
        self.query = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.host = ""
        self.host_raw = b""
        self.host_count = 0
        self.upstream_extra: list[tuple[bytes, bytes]] = []
        self.has_connection_header = False
        self.keep_alive = True
        self.key_prefix = ""  # the first characters of a presented key, for anomaly detection
        self.body_kind = BODY_NONE
        self.content_length = 0
        self.body_received = 0
        self.body_complete = False
        self.body_chunks: list[bytes] | None = None
        self.buffered = 0
        self.expect_continue = 0  # 0 none, 1 "100-continue", 2 anything else
        self.upgrade = False
        self.route: Route | None = None
        self.client_ip = ""
        self.xff = b""
        self.request_id = ""
        self.response_extra: list[tuple[bytes, bytes]] = []
        self.response_started = False
        self.retried = False
        self.discarding = False  # answered already; the rest of its body is read and dropped
        self.bytes_out = 0
        self.error_code = ""
        self.upstream_started = 0.0
        self.upstream_ended = 0.0
        self.done = False
        self.status = 0
        self.upstream_status = 0
        self.upstream: UpstreamConnection | None = None
        self.principal: CachedKey | None = None
        self.credential_header: bytes | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of a (lower-case) header, or None."""
        for n, v in self.headers:
            if n == name:
                return v
        return None
