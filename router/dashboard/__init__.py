"""The ops dashboard served by the gateway (``/dashboard``) and the observer behind it.

``install_dashboard(app, gateway)`` adds the page, its state and live-stream endpoints and
the admin actions to a gateway app (``router.dashboard.app``); ``FleetObserver``
(``router.dashboard.observer``) is what it reads the gateway with. docs/dashboard.md
describes the page.
"""

from router.dashboard.app import install_dashboard
from router.dashboard.observer import FleetObserver

__all__ = ["FleetObserver", "install_dashboard"]
