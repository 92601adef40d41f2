-- Personal data sealed per user (crypto-shredding): each user's data key, wrapped by a
-- key-encryption key (KEK), inserted with `UserCreated` and deleted with `AccountDeleted`,
-- and one check value per KEK (see the PostgreSQL migration 0007). The connection runs with
-- `secure_delete`, so a deleted key's bytes are overwritten in the file.
CREATE TABLE user_keys
(
    user_id    TEXT PRIMARY KEY,
    kek_id     TEXT NOT NULL,
    wrapped    BLOB NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX user_keys_kek_id ON user_keys (kek_id);

CREATE TABLE kek_checks
(
    kek_id      TEXT PRIMARY KEY,
    check_value BLOB NOT NULL,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
