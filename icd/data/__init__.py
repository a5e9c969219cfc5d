"""Benchmark streams: the dataset registry, stream sources and the offline shapes fixture."""

from icd.data.registry import (
    DATASETS,
    DatasetSpec,
    RegistryFileError,
    UnknownDataset,
    get_dataset,
    load_registry_file,
)
from icd.data.shapes import build_shapes_dataset
from icd.data.stream import DatasetUnavailable, Stream, open_stream
from icd.data.types import Chunk, Sample

__all__ = [
    "DATASETS",
    "Chunk",
    "DatasetSpec",
    "DatasetUnavailable",
    "RegistryFileError",
    "Sample",
    "Stream",
    "UnknownDataset",
    "build_shapes_dataset",
    "get_dataset",
    "load_registry_file",
    "open_stream",
]
