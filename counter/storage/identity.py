"""Values made once and kept in the database: its identity and the user-hash key."""

import secrets
import uuid

import psycopg2
import psycopg2.errors


def database_id(conn) -> str:
    """This database's identity: a UUID made once and kept in it. Many URLs
    may name one database; this names it for good."""
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO service_secrets (name, value) VALUES ('database_id', %s)"
                    " ON CONFLICT (name) DO NOTHING", (str(uuid.uuid4()).encode(),))
        cur.execute("SELECT value FROM service_secrets WHERE name = 'database_id'")
        return bytes(cur.fetchone()[0]).decode()


def user_hash_key(conn) -> bytes:
    """The key for hashing user ids: made once, kept in the database, so every
    node and restart hashes a user the same way."""
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO service_secrets (name, value) VALUES ('user_hash_key', %s)"
                    " ON CONFLICT (name) DO NOTHING", (psycopg2.Binary(secrets.token_bytes(32)),))
        cur.execute("SELECT value FROM service_secrets WHERE name = 'user_hash_key'")
        return bytes(cur.fetchone()[0])
