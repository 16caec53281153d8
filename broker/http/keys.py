"""Typed aiohttp application keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from broker.http.admissions import Admissions
from broker.http.replies import CredentialReplies
from broker.services import Services

if TYPE_CHECKING:  # fast_lane reads the keys above
    from broker.http.fast_lane import FastLane

__all__ = ["ADMISSIONS", "FAST_LANE", "REPLIES", "SERVICES"]

SERVICES = web.AppKey("services", Services)
REPLIES = web.AppKey("credential_replies", CredentialReplies)
ADMISSIONS = web.AppKey("admissions", Admissions)
FAST_LANE: web.AppKey[FastLane] = web.AppKey("fast_lane")
