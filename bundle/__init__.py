"""SoftCAM MONAI bundle: networks, losses, data checks, handlers and tracking.

The submodules are imported here so that configs can name them after a single ``$import bundle``.
"""

from bundle import data, handlers, losses, networks, synthetic, tracking, visualize

__version__ = "0.1.0"
__all__ = ["data", "handlers", "losses", "networks", "synthetic", "tracking", "visualize"]
