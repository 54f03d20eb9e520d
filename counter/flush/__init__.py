"""The flusher: moves counts from shared memory into PostgreSQL exactly once
(flusher.py), and reports on itself (status.py)."""
