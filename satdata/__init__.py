"""satdata: turn a dataset's own annotations (or a teacher's saliency) into a satkit store.

The public API (docs/api.md); these names are a promise, the modules behind them may move:

- ``open_store(path_or_url, storage_options=None)``: a store, checked, for reading
  (``Store.info``: classes, splits, maps; ``Store.load(split, "images")``...).
- ``StoreWriter(path, dataset=..., classes=..., image_size=..., maps=...)``: write a store
  from one's own converter, sample by sample; committed atomically when it closes.
- ``Store``, ``StoreInfo``, ``MapInfo``: what a store is; ``SatkitError``: every error
  satkit reports (one line, naming the file or option).

The store format itself lives in :mod:`satdata.store` (numpy + zarr only), which the
trainer imports too; nothing else knows array names or attribute keys.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "open_store": "satdata.store",
    "Store": "satdata.store",
    "StoreInfo": "satdata.store",
    "MapInfo": "satdata.store",
    "StoreWriter": "satdata.writer",
    "SatkitError": "satdata.errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'satdata' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
