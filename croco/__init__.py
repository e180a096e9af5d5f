"""croco: cross-lingual contrastive preference tuning on self-generations.

The library layer: plain Python, no Prefect import. Every stage reads its inputs by URI,
writes its outputs atomically under a content-addressed location and returns it.
"""

__version__ = "0.1.0"
