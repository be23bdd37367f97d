"""In-memory vendor and gateway clients that run the sandboxes' own rules, for handler tests."""
