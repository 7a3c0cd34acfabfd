\echo Use "CREATE EXTENSION kb_bm25" to load this file. \quit

-- The best `top` chunks for a query's terms, best first; search/retrieval.py passes each
-- term's BM25 weight and length normalisation, and kb_bm25.c explains the rest.
CREATE FUNCTION kb_bm25_top_chunks(
    postings regclass, collection_ids int8[], lexemes text[], document_frequencies int8[],
    weights float8[], length_bases float8[], length_slopes float8[], top int4
) RETURNS TABLE (chunk_id int8, score float8)
AS 'MODULE_PATHNAME', 'kb_bm25_top_chunks'
LANGUAGE C STABLE STRICT PARALLEL RESTRICTED ROWS 100;

-- Not for every role: the function reads an index directly. It checks SELECT on the table
-- it is given as well; search.postgres_extension grants EXECUTE to the application's role.
REVOKE EXECUTE ON FUNCTION kb_bm25_top_chunks(regclass, int8[], text[], int8[], float8[], float8[], float8[], int4)
    FROM PUBLIC;
