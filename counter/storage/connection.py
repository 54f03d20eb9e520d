"""Connections to PostgreSQL: opening them with short timeouts, and errors fit for logs."""

import re

import psycopg2
import psycopg2.errors

DatabaseError = psycopg2.Error


def redact(url: str) -> str:
    """The URL with its password replaced, fit for logs and error messages."""
    url = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)
    return re.sub(r"(password=)\S+", r"\1***", url)


def describe_error(exc: BaseException, url: str = "") -> str:
    """One line about a database error, never holding the password."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if url:
        text = text.replace(url, redact(url))
    return redact(text)


def connect(url: str, application_name: str = "click-counter", statement_timeout_ms=None):
    """A connection that gives up on a dead or silent server in seconds, not
    minutes: connect timeout, TCP keepalives and a TCP user timeout."""
    options = {}
    if statement_timeout_ms:
        options["options"] = f"-c statement_timeout={int(statement_timeout_ms)}"
    return psycopg2.connect(
        url, connect_timeout=5, application_name=application_name,
        keepalives=1, keepalives_idle=10, keepalives_interval=3, keepalives_count=3,
        tcp_user_timeout=30_000, **options,
    )


def close_quietly(conn):
    """Close a connection that may already be broken."""
    if conn is not None:
        try:
            conn.close()
        except psycopg2.Error:
            pass
