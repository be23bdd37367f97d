"""Helpers for cancelflow's own tests (in-memory stand-ins for external systems); not used in production."""
