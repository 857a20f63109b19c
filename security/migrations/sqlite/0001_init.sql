-- scm Security server schema (SQLite). Keep in step with ../postgres/0001_init.sql.
CREATE TABLE sites (
    name        TEXT PRIMARY KEY,
    proxy_urls  TEXT NOT NULL,          -- JSON array of host:port
    created_at  BIGINT NOT NULL
);
CREATE TABLE users (
    name           TEXT PRIMARY KEY,
    source         TEXT NOT NULL,       -- local | ldap
    password_hash  TEXT,                -- argon2id PHC string (local users only)
    ldap_dn        TEXT,                -- bind DN (LDAP users only)
    groups_json    TEXT NOT NULL,       -- JSON array
    site           TEXT NOT NULL,
    created_at     BIGINT NOT NULL
);
CREATE TABLE device_keys (
    key_id      TEXT PRIMARY KEY,
    user_name   TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    app_id      TEXT NOT NULL,
    sealed_key  BLOB NOT NULL,          -- AES-256-GCM(master key, shared key, aad = key_id)
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);
CREATE INDEX device_keys_user ON device_keys (user_name);
CREATE INDEX device_keys_device ON device_keys (device_id);
CREATE TABLE activation_codes (
    code_hash   TEXT PRIMARY KEY,       -- SHA-256 hex of the code
    user_name   TEXT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT
);
CREATE TABLE app_releases (
    app_id        TEXT NOT NULL,
    platform      TEXT NOT NULL,
    version       TEXT NOT NULL,
    sha256        TEXT NOT NULL,
    size          BIGINT NOT NULL,
    published_at  BIGINT NOT NULL,
    PRIMARY KEY (app_id, platform, version)
);
CREATE TABLE app_policies (
    app_id                 TEXT PRIMARY KEY,
    min_version            TEXT,
    revoked_versions_json  TEXT NOT NULL
);
CREATE TABLE resources (
    name                 TEXT PRIMARY KEY,
    address              TEXT NOT NULL,
    mode                 TEXT NOT NULL,
    allowed_groups_json  TEXT NOT NULL
);
CREATE TABLE audit_log (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       BIGINT NOT NULL,
    kind     TEXT NOT NULL,
    actor    TEXT NOT NULL,
    subject  TEXT NOT NULL,
    source   TEXT NOT NULL,
    detail   TEXT NOT NULL
);
