"""Which asyncio event loop the broker runs on: uvloop when installed (``auto``), or asyncio's.

``listen.event_loop`` (``auto``, ``asyncio`` or ``uvloop``; ``sts-broker serve
--loop`` overrides it) is passed to ``install`` before ``asyncio.run``.  uvloop
is the optional extra ``pip install 'oss-sts-broker[fast]'``; nothing else in
the broker depends on which loop runs.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Literal

from broker.errors import ConfigError

__all__ = ["CHOICES", "EventLoopChoice", "install", "running_loop_name"]

EventLoopChoice = Literal["auto", "asyncio", "uvloop"]
CHOICES: tuple[EventLoopChoice, ...] = ("auto", "asyncio", "uvloop")

_MISSING = (
    "listen.event_loop: uvloop is not installed; install it with "
    "pip install 'oss-sts-broker[fast]', or choose auto or asyncio"
)


def install(choice: str) -> str:
    """Install the loop policy ``choice`` asks for; return the one installed: asyncio or uvloop.

    ``auto`` installs uvloop when it can be imported and the standard loop
    otherwise; ``uvloop`` raises ``ConfigError`` when it cannot be imported.
    """
    if choice not in CHOICES:
        raise ConfigError([f"event loop {choice!r} is not one of {', '.join(CHOICES)}"])
    if choice == "asyncio":
        asyncio.set_event_loop_policy(None)  # the default policy: the standard loop
        return "asyncio"
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise ConfigError([_MISSING]) from None
        asyncio.set_event_loop_policy(None)
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: the loop running now (for the ``broker_started`` line)."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.split(".")[0] == "uvloop" else "asyncio"
