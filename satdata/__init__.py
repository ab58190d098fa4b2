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

__version__ = "0.1.0"

from satdata.errors import SatkitError  # noqa: E402 - after __version__, which the modules read
from satdata.store import MapInfo, Store, StoreInfo, open_store  # noqa: E402
from satdata.writer import StoreWriter  # noqa: E402

__all__ = ["__version__", "open_store", "Store", "StoreInfo", "MapInfo", "StoreWriter", "SatkitError"]
