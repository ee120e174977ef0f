"""psal: image editing networks built around PSAL, the Patch-based Stochastic Attention Layer."""

__version__ = "0.1.0"
