\echo Use "ALTER EXTENSION kb_bm25 UPDATE" to load this file. \quit

-- 1.1: EXECUTE is no longer PUBLIC's (the library itself now checks SELECT on the table).
REVOKE EXECUTE ON FUNCTION kb_bm25_top_chunks(regclass, int8[], text[], int8[], float8[], float8[], float8[], int4)
    FROM PUBLIC;
