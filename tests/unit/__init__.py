"""Unit tests: one process, no broker; fakes only where a peer would be."""
