"""Rigs spread over several capture PCs: one host agent per host, a Ray actor pinned to that host."""

from __future__ import annotations

#: prefix of the custom resource that a capture host's Ray node offers (one unit)
HOST_RESOURCE_PREFIX = "capture-host:"


def host_resource(host: str) -> str:
    """The custom resource that pins a capture host's agent to that host's node."""
    return f"{HOST_RESOURCE_PREFIX}{host}"
