"""Adapters that hold cache entries: the memory and disk tiers and their ``Tier`` protocol."""

from edgecache.stores.disk import DiskTier
from edgecache.stores.memory import MemoryTier
from edgecache.stores.tier import Tier
from edgecache.stores.tiered import TieredStore

__all__ = ["DiskTier", "MemoryTier", "Tier", "TieredStore"]
