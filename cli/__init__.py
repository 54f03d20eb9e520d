"""The `counter` operator command line (built with click)."""
