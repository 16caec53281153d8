"""Typed aiohttp application keys."""

from __future__ import annotations

from aiohttp import web

from broker.services import Services

__all__ = ["SERVICES"]

SERVICES = web.AppKey("services", Services)
