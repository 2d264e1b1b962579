"""Integration tests against real third-party peers (see README.md)."""
