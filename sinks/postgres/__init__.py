"""The PostgreSQL loader: committed staged parts into typed, deduplicated tables, each part exactly once.

Per source and manifest the table is first created or evolved to the declared
fields (``_ddl``). Parts are read through the ``Stager`` protocol (local or S3
alike), decoded, validated, deduplicated and encoded as COPY files (``_prepare``:
compiled, with ``sinks.validate`` for what it refuses) in a decoding process
while the previous part is written. Each part is one transaction (``_part``):
compare with the table by key and content hash, COPY new rows, update changed
ones, leave unchanged ones alone, one narrow lineage row per record, rejects
and the ledger row. ``_queries``
reads it back (``lineage``, validators for conditional requests).
"""

from sinks.postgres._ddl import LAYOUT, PG_TYPES, views_schema
from sinks.postgres._loader import Loader
from sinks.postgres._part import PartLoad
from sinks.postgres._queries import lineage, load_lastmods, load_validators
from sinks.validate import coerce, jsonb

__all__ = [
    "LAYOUT",
    "PG_TYPES",
    "Loader",
    "PartLoad",
    "coerce",
    "jsonb",
    "lineage",
    "load_lastmods",
    "load_validators",
    "views_schema",
]
