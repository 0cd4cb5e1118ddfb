"""Tests that need a real database server (PostgreSQL); skipped where none is reachable."""
