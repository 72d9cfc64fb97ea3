"""wsi-histosge: spatial gene expression from H&E whole-slide images (HisToSGE)."""

from __future__ import annotations

__version__ = "0.1.0"
