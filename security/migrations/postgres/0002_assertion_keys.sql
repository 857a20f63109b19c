-- Signing keys of the identity assertions (ES256 JWTs for http back ends). Keep in step with
-- ../sqlite/0002_assertion_keys.sql.
CREATE TABLE assertion_keys (
    kid             TEXT PRIMARY KEY,     -- the JWK's "kid" and the JWS header's
    sealed_key      BYTEA NOT NULL,       -- AES-256-GCM(master key, PKCS#8 P-256 key, aad = "assertion-key:" || kid)
    created_at      BIGINT NOT NULL,
    active_from     BIGINT NOT NULL       -- signs from then on (published before, so every instance has it)
);
