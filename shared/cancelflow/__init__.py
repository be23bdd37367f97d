"""cancelflow: the shared library every service imports (events, messaging, storage, settings)."""
