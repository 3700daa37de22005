"""SoftCAM MONAI bundle: networks, losses, data checks, explanations, handlers, tracking and PACS.

Configs name submodules after a single ``$import bundle`` (``bundle.data.load_datalist``): they are
imported on first use, so a tool that needs one part (the PACS node, say) does not pay for the rest.
"""

import importlib

from bundle import privacy as _privacy

_privacy.install()  # before any library can print a patient's data: see bundle/privacy.py

__version__ = "0.2.0"
__all__ = ["acceleration", "benchmark", "checkpoints", "data", "datalist_builder", "distributed", "explain", "files",
           "flags", "handlers", "inference", "inputs", "label_table", "losses", "model_registry", "networks", "pacs",
           "privacy", "runs", "splits", "synthetic", "tracking", "visualize", "writers"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"bundle.{name}")
    raise AttributeError(f"module 'bundle' has no attribute {name!r}")
