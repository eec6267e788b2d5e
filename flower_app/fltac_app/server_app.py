"""ServerApp: fltac's in-process round loop with its clients behind the Flower Grid (fltac.engines.flower)."""

from fltac.engines.flower import server_app as app

__all__ = ["app"]
