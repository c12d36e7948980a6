"""Clients: ``AsyncClient`` holds the logic, ``Client`` is its blocking facade."""

from runlane.client.async_client import AsyncClient
from runlane.client.portal import Portal
from runlane.client.sync_client import Client

__all__ = ["AsyncClient", "Client", "Portal"]
