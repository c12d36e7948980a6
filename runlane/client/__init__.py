"""Clients: ``AsyncClient`` holds the logic, ``Client`` is its blocking facade."""

from runlane.client.async_client import AsyncClient
from runlane.client.portal import Portal
from runlane.client.sync_client import Client
from runlane.client.workflows import BatchItem

__all__ = ["AsyncClient", "BatchItem", "Client", "Portal"]
