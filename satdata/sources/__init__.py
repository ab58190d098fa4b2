"""Dataset readers, one module per on-disk format, found by name in a registry."""

from satdata.sources._base import (
    BadSamples,
    Decoded,
    MapSpec,
    Record,
    Source,
    SourceOptions,
    get_source_class,
    make_source,
    register_source,
    source_names,
)

# Importing a module registers its sources.
from satdata.sources import digits  # noqa: F401,E402
from satdata.sources import voc  # noqa: F401,E402
from satdata.sources import coco  # noqa: F401,E402
from satdata.sources import tiny_imagenet  # noqa: F401,E402
from satdata.sources import flowers17  # noqa: F401,E402
from satdata.sources import folder  # noqa: F401,E402
from satdata.sources import cifar  # noqa: F401,E402
from satdata.sources import h5  # noqa: F401,E402

__all__ = [
    "BadSamples",
    "Decoded",
    "MapSpec",
    "Record",
    "Source",
    "SourceOptions",
    "get_source_class",
    "make_source",
    "register_source",
    "source_names",
]
