"""The handoff bundle: what leaves the studio, signed and verifiable."""
