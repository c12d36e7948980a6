"""Find the user's app from a ``module:attr`` path, the way ``uvicorn main:app`` does."""

from __future__ import annotations

import importlib
import os
import sys

from runlane.app import Runlane


class AppNotFound(ValueError):
    """Raised when an APP path cannot be imported or does not name a Runlane app."""


def load_app(path: str) -> Runlane:
    """Import ``module:attr`` (``module`` alone means ``module:app``) with the cwd first on ``sys.path``,
    so that ``runlane worker tasks:app`` works from a project directory without installing it."""
    module_name, _, attr = path.partition(":")
    module_name, attr = module_name.strip(), attr.strip() or "app"
    if not module_name:
        raise AppNotFound(f"invalid app path {path!r}: expected module:attribute, e.g. tasks:app")
    cwd = os.getcwd()
    if cwd not in sys.path[:1]:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise AppNotFound(f"cannot import {module_name!r} (looked in {cwd} and sys.path)") from None
        raise  # the module exists but one of its own imports is missing: show the real cause
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppNotFound(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, Runlane):
        raise AppNotFound(f"{module_name}:{attr} is a {type(obj).__name__}, not a Runlane app")
    return obj
