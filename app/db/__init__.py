"""The storage layer: tables, engine and sessions, read queries. Never imports torch."""
