"""Dev mode, loaded only by ``sts-broker dev`` and tests; ``serve`` never imports it.

``stack.dev_stack()`` wires the STS and OSS emulators (``emulators/``) to the
broker's services; ``demo.demo_routes()`` serves the demo upload page.  This
``__init__`` imports nothing, so naming a submodule loads only that submodule.
"""

from __future__ import annotations

__all__: list[str] = []
