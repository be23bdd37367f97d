"""cancelflow's tooling: the CLI, the local stack, sandboxes, the SMTP sink, bench, chaos and the invariant checker.

No service imports it; it imports the services and the runtime (cancelflow).
"""
