-- Keys and the audit trail (SQLite).
-- Timestamps are ISO-8601 UTC text of fixed width, 'YYYY-MM-DDTHH:MM:SS.ffffffZ', so that text order
-- is time order. List fields and the audit change are JSON text. The raw key is never stored: only
-- its digest (HMAC of key and pepper) and a display hint.

CREATE TABLE api_keys (
    id             TEXT    NOT NULL PRIMARY KEY,
    owner          TEXT    NOT NULL,
    name           TEXT    NOT NULL,
    env            TEXT    NOT NULL,
    digest         BLOB    NOT NULL,
    pepper_version INTEGER NOT NULL,
    hint           TEXT    NOT NULL,
    scopes         TEXT    NOT NULL DEFAULT '[]',
    allow_ips      TEXT    NOT NULL DEFAULT '[]',
    limits         TEXT    NOT NULL DEFAULT '[]',
    status         TEXT    NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked', 'suspended')),
    created_at     TEXT    NOT NULL,
    expires_at     TEXT,
    revoked_at     TEXT,
    revoke_reason  TEXT,
    rotated_to     TEXT    REFERENCES api_keys (id),
    rotated_from   TEXT    REFERENCES api_keys (id),
    grace_until    TEXT,
    last_used_at   TEXT
);

CREATE UNIQUE INDEX api_keys_digest_key ON api_keys (digest);
CREATE INDEX api_keys_owner_idx ON api_keys (owner);
CREATE INDEX api_keys_created_at_idx ON api_keys (created_at);

CREATE TABLE audit_log (
    id        INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    at        TEXT    NOT NULL,
    action    TEXT    NOT NULL,
    actor     TEXT    NOT NULL,
    source_ip TEXT    NOT NULL,
    key_id    TEXT,
    change    TEXT    NOT NULL DEFAULT '{}'
);

CREATE INDEX audit_log_at_idx ON audit_log (at);
CREATE INDEX audit_log_key_id_at_idx ON audit_log (key_id, at);
