"""LoRA adapter store: validated sources, GPU/CPU/disk tiers with LRU and pinning, background loads,
merged snapshots for hot tenants. Imports nothing from ``server``."""

from adapter_store.loader import AdapterLoadError, LoadedAdapter, peft_name, read_adapter
from adapter_store.registry import AdapterRefusedError, AdapterRegistry, AdapterSource, check_name
from adapter_store.snapshots import SnapshotManager, build_merged
from adapter_store.store import AdapterInfo, AdapterStore, Lease, ServingStore, StoreObserver

__all__ = [
    "AdapterInfo",
    "AdapterLoadError",
    "AdapterRefusedError",
    "AdapterRegistry",
    "AdapterSource",
    "AdapterStore",
    "Lease",
    "LoadedAdapter",
    "ServingStore",
    "SnapshotManager",
    "StoreObserver",
    "build_merged",
    "check_name",
    "peft_name",
    "read_adapter",
]
