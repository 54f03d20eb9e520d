"""The harness shared by tests/ and loadtest/: real service trees, load,
hostile clients, audits. Not imported by the service."""
