"""satdata: turn a dataset's own annotations (or a teacher's saliency) into a satkit store.

The store format itself lives in :mod:`satdata.store` (numpy + zarr only), which the
trainer imports too; nothing else knows array names or attribute keys.
"""

__version__ = "0.1.0"
