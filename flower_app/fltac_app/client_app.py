"""ClientApp: each SuperNode trains its own partition (node-config partition-id / num-partitions)."""

from fltac.engines.flower import client_app as app

__all__ = ["app"]
