"""The demonstration pool: accepted teacher annotations, durable in LanceDB.

Three concerns, one module each: :mod:`~icd.storage.pool.schema` (the row schema and the
validation of new rows), :mod:`~icd.storage.pool.index` (the in-memory selection index
that demo selection reads) and :mod:`~icd.storage.pool.table` (the LanceDB table handle,
:class:`DemoPool`, that keeps both in step).
"""

from icd.storage.pool.index import PoolView
from icd.storage.pool.schema import (
    MERGE_KEY,
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    VECTOR_FIELDS,
    PoolError,
    pool_schema,
    row_key,
)
from icd.storage.pool.table import DEFAULT_TABLE, DemoPool, inspect_pool

__all__ = [
    "DEFAULT_TABLE",
    "MERGE_KEY",
    "OPTIONAL_FIELDS",
    "REQUIRED_FIELDS",
    "VECTOR_FIELDS",
    "DemoPool",
    "PoolError",
    "PoolView",
    "inspect_pool",
    "pool_schema",
    "row_key",
]
