"""Test fixtures and builders shared by the test modules (never imported by library code)."""
