"""Which asyncio event loop the broker runs on: uvloop when installed (``auto``), or asyncio's.

``listen.event_loop`` (``auto``, ``asyncio`` or ``uvloop``; ``sts-broker serve
--loop`` overrides it) is passed to ``install`` before ``asyncio.run``.  uvloop
is the optional extra ``pip install 'oss-sts-broker[fast]'``; nothing else in
the broker depends on which loop runs.  ``settle_heap`` readies the
process's heap for serving, once start-up is done.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
from typing import Literal

from broker.errors import ConfigError

__all__ = [
    "CHOICES",
    "GC_YOUNG_THRESHOLD",
    "EventLoopChoice",
    "install",
    "running_loop_name",
    "settle_heap",
]

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


def settle_heap() -> None:
    """Move what start-up built (modules, settings, policies) out of the collector's sight.

    Every full collection would otherwise walk those few hundred thousand
    objects again; they live as long as the process (``gc.freeze``).  And
    collect the youngest generation every ``GC_YOUNG_THRESHOLD`` allocations
    instead of Python's 700: a request's objects are freed by reference
    counting, but each young collection walks what is alive in flight, a
    cost per collection, not per object, so fewer collections cost less.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


GC_YOUNG_THRESHOLD = 10_000
"""Allocations between two collections of the youngest generation (Python's default: 700)."""
