"""Typed aiohttp application keys."""

from __future__ import annotations

from aiohttp import web

from broker.http.admissions import Admissions
from broker.http.replies import CredentialReplies
from broker.services import Services

__all__ = ["ADMISSIONS", "REPLIES", "SERVICES"]

SERVICES = web.AppKey("services", Services)
REPLIES = web.AppKey("credential_replies", CredentialReplies)
ADMISSIONS = web.AppKey("admissions", Admissions)
