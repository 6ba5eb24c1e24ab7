-- Keys and the audit trail (PostgreSQL).
-- Timestamps are timestamptz (microseconds). List fields are text[]; the audit change is jsonb.
-- The raw key is never stored: only its digest (HMAC of key and pepper) and a display hint.

CREATE TABLE api_keys (
    id             text        NOT NULL PRIMARY KEY,
    owner          text        NOT NULL,
    name           text        NOT NULL,
    env            text        NOT NULL,
    digest         bytea       NOT NULL,
    pepper_version integer     NOT NULL,
    hint           text        NOT NULL,
    scopes         text[]      NOT NULL DEFAULT '{}',
    allow_ips      text[]      NOT NULL DEFAULT '{}',
    limits         text[]      NOT NULL DEFAULT '{}',
    status         text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked', 'suspended')),
    created_at     timestamptz NOT NULL,
    expires_at     timestamptz,
    revoked_at     timestamptz,
    revoke_reason  text,
    rotated_to     text        REFERENCES api_keys (id),
    rotated_from   text        REFERENCES api_keys (id),
    grace_until    timestamptz,
    last_used_at   timestamptz
);

CREATE UNIQUE INDEX api_keys_digest_key ON api_keys (digest);
CREATE INDEX api_keys_owner_idx ON api_keys (owner);
CREATE INDEX api_keys_created_at_idx ON api_keys (created_at);

CREATE TABLE audit_log (
    id        bigserial   NOT NULL PRIMARY KEY,
    at        timestamptz NOT NULL,
    action    text        NOT NULL,
    actor     text        NOT NULL,
    source_ip text        NOT NULL,
    key_id    text,
    change    jsonb       NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX audit_log_at_idx ON audit_log (at);
CREATE INDEX audit_log_key_id_at_idx ON audit_log (key_id, at);
