"""The BM25 index, kept up to date by triggers on kb_chunk.

- A row trigger fills search_vector (to_tsvector with the collection's configuration over
  search_context and text) and search_length (the number of lexeme occurrences, BM25's
  document length |D|) whenever a chunk's text changes.
- Statement triggers with transition tables apply each statement's searchable rows to the
  index in bulk: postings (one row per lexeme and chunk, with its term frequency), document
  frequency per lexeme, and per-collection chunk count and total length. Rows a statement
  deleted (or made unsearchable) are subtracted, rows it inserted (or made searchable) are
  added. Upserts go in (collection, lexeme) order, so concurrent ingestions take row locks
  in the same order and cannot deadlock each other.

So the index is maintained incrementally by whatever writes chunks (bulk inserts, cascade
deletes, queryset updates), and a query never rebuilds anything.
"""

from django.db import migrations

FORWARD = r"""
CREATE TABLE search_posting (
    collection_id bigint NOT NULL,
    lexeme text NOT NULL,
    chunk_id bigint NOT NULL,
    term_frequency integer NOT NULL,
    chunk_length integer NOT NULL,
    PRIMARY KEY (collection_id, lexeme, chunk_id) INCLUDE (term_frequency, chunk_length)
);

CREATE FUNCTION search_tsvector_length(vec tsvector) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(sum(coalesce(array_length(u.positions, 1), 1)), 0)::integer
    FROM unnest(vec) AS u
$$;

CREATE FUNCTION search_chunk_fill_vector() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    config regconfig;
BEGIN
    SELECT text_search_config::regconfig INTO config FROM kb_collection WHERE id = NEW.collection_id;
    NEW.search_vector := to_tsvector(config, coalesce(NEW.search_context, '') || E'\n' || NEW.text);
    NEW.search_length := search_tsvector_length(NEW.search_vector);
    RETURN NEW;
END
$$;

CREATE TRIGGER search_chunk_fill_vector
BEFORE INSERT OR UPDATE OF text, search_context, collection_id ON kb_chunk
FOR EACH ROW EXECUTE FUNCTION search_chunk_fill_vector();

-- Apply a set of chunk rows to the index: sign +1 adds them, -1 removes them.
CREATE FUNCTION search_bm25_apply(
    p_chunk bigint[], p_collection bigint[], p_vector tsvector[], p_length integer[],
    p_sign integer[]
) RETURNS void
LANGUAGE sql AS $$
    DELETE FROM search_posting AS p
    USING unnest(p_chunk, p_collection, p_vector, p_sign) AS d(chunk_id, collection_id, vec, sign)
    CROSS JOIN LATERAL unnest(d.vec) AS u
    WHERE d.sign < 0
      AND p.collection_id = d.collection_id AND p.lexeme = u.lexeme AND p.chunk_id = d.chunk_id;

    INSERT INTO search_posting (collection_id, lexeme, chunk_id, term_frequency, chunk_length)
    SELECT d.collection_id, u.lexeme, d.chunk_id, coalesce(array_length(u.positions, 1), 1), d.len
    FROM unnest(p_chunk, p_collection, p_vector, p_length, p_sign)
         AS d(chunk_id, collection_id, vec, len, sign)
    CROSS JOIN LATERAL unnest(d.vec) AS u
    WHERE d.sign > 0
    ON CONFLICT (collection_id, lexeme, chunk_id) DO UPDATE
    SET term_frequency = EXCLUDED.term_frequency, chunk_length = EXCLUDED.chunk_length;

    INSERT INTO search_termstatistic AS t (collection_id, lexeme, document_frequency)
    SELECT d.collection_id, u.lexeme, sum(d.sign)
    FROM unnest(p_collection, p_vector, p_sign) AS d(collection_id, vec, sign)
    CROSS JOIN LATERAL unnest(d.vec) AS u
    GROUP BY d.collection_id, u.lexeme
    HAVING sum(d.sign) <> 0
    ORDER BY d.collection_id, u.lexeme
    ON CONFLICT (collection_id, lexeme)
    DO UPDATE SET document_frequency = t.document_frequency + EXCLUDED.document_frequency;

    INSERT INTO search_collectionstatistic AS s (collection_id, chunk_count, total_length)
    SELECT d.collection_id, sum(d.sign), sum(d.sign * d.len)
    FROM unnest(p_collection, p_length, p_sign) AS d(collection_id, len, sign)
    GROUP BY d.collection_id
    ORDER BY d.collection_id
    ON CONFLICT (collection_id)
    DO UPDATE SET chunk_count = s.chunk_count + EXCLUDED.chunk_count,
                  total_length = s.total_length + EXCLUDED.total_length;
$$;

CREATE FUNCTION search_chunk_statistics() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    chunks bigint[];
    collections bigint[];
    vectors tsvector[];
    lengths integer[];
    signs integer[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(id), array_agg(collection_id), array_agg(search_vector),
               array_agg(search_length), array_agg(1)
        INTO chunks, collections, vectors, lengths, signs
        FROM new_rows WHERE searchable AND search_vector IS NOT NULL;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(id), array_agg(collection_id), array_agg(search_vector),
               array_agg(search_length), array_agg(-1)
        INTO chunks, collections, vectors, lengths, signs
        FROM old_rows WHERE searchable AND search_vector IS NOT NULL;
    ELSE
        -- Removals first: an updated row appears as -1 (old) then +1 (new).
        SELECT array_agg(id ORDER BY sign), array_agg(collection_id ORDER BY sign),
               array_agg(search_vector ORDER BY sign), array_agg(search_length ORDER BY sign),
               array_agg(sign ORDER BY sign)
        INTO chunks, collections, vectors, lengths, signs
        FROM (
            SELECT id, collection_id, search_vector, search_length, -1 AS sign
            FROM old_rows WHERE searchable AND search_vector IS NOT NULL
            UNION ALL
            SELECT id, collection_id, search_vector, search_length, 1
            FROM new_rows WHERE searchable AND search_vector IS NOT NULL
        ) AS changed;
    END IF;
    IF chunks IS NOT NULL THEN
        PERFORM search_bm25_apply(chunks, collections, vectors, lengths, signs);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER search_chunk_statistics_insert
AFTER INSERT ON kb_chunk REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION search_chunk_statistics();

CREATE TRIGGER search_chunk_statistics_delete
AFTER DELETE ON kb_chunk REFERENCING OLD TABLE AS old_rows
FOR EACH STATEMENT EXECUTE FUNCTION search_chunk_statistics();

CREATE TRIGGER search_chunk_statistics_update
AFTER UPDATE ON kb_chunk REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION search_chunk_statistics();
"""

BACKWARD = r"""
DROP TRIGGER IF EXISTS search_chunk_statistics_update ON kb_chunk;
DROP TRIGGER IF EXISTS search_chunk_statistics_delete ON kb_chunk;
DROP TRIGGER IF EXISTS search_chunk_statistics_insert ON kb_chunk;
DROP FUNCTION IF EXISTS search_chunk_statistics();
DROP FUNCTION IF EXISTS search_bm25_apply(bigint[], bigint[], tsvector[], integer[], integer[]);
DROP TRIGGER IF EXISTS search_chunk_fill_vector ON kb_chunk;
DROP FUNCTION IF EXISTS search_chunk_fill_vector();
DROP FUNCTION IF EXISTS search_tsvector_length(tsvector);
DROP TABLE IF EXISTS search_posting;
"""


class Migration(migrations.Migration):
    dependencies = [
        ("search", "0001_initial"),
        ("kb", "0001_initial"),
    ]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
