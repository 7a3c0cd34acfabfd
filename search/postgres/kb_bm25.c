/*
 * kb_bm25: the exact BM25 top k of a query over the knowledge base's postings index.
 *
 * The same sum as the SQL in search/retrieval.py, computed here because PostgreSQL's
 * executor spends about 0.4 µs on each posting of a GROUP BY over an index-only scan
 * (scan node, join, expression, hash aggregate, sort), and a long query has 100,000
 * postings at 100k chunks. This function walks the primary-key index of search_posting
 * (collection_id, lexeme, chunk_id) INCLUDE (term_frequency, chunk_length) once per
 * query term, exactly as an index-only scan does, and adds each posting's contribution
 * into a hash table keyed by chunk. It knows nothing of BM25's statistics: the caller
 * passes each term's weight and length normalisation, so the formula lives in one place.
 */
#include "postgres.h"

#include <math.h>

#include "access/genam.h"
#include "access/relscan.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/visibilitymap.h"
#include "catalog/pg_am_d.h"
#include "catalog/pg_type.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/bufmgr.h"
#include "storage/predicate.h"
#include "utils/array.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/snapmgr.h"
#include "utils/tuplestore.h"

PG_MODULE_MAGIC;

/* Columns of the postings index, in order: three keys, then two included columns. */
#define POSTING_COLLECTION 0
#define POSTING_LEXEME 1
#define POSTING_CHUNK 2
#define POSTING_TERM_FREQUENCY 3
#define POSTING_CHUNK_LENGTH 4
#define POSTING_COLUMNS 5
#define POSTING_KEY_COLUMNS 3

/* Never size the hash table for more chunks than this up front (6 MB); it grows if need be. */
#define MAX_PRESIZED_CHUNKS (1 << 18)
/* The array is used when the chunk ids' range is at most this many times the postings
 * (plus a floor for short lists), and fits in work_mem. */
#define DENSE_RANGE_PER_POSTING 16
#define DENSE_RANGE_FLOOR 65536

static inline uint32
chunk_hash(uint64 h)
{
	/* splitmix64's finaliser: chunk ids are sequential, and their low bits would cluster */
	h ^= h >> 30;
	h *= UINT64CONST(0xbf58476d1ce4e5b9);
	h ^= h >> 27;
	h *= UINT64CONST(0x94d049bb133111eb);
	h ^= h >> 31;
	return (uint32) h;
}

typedef struct ChunkScore
{
	int64		chunk_id;
	double		score;
	char		status;			/* simplehash's own */
} ChunkScore;

#define SH_PREFIX chunk_scores
#define SH_ELEMENT_TYPE ChunkScore
#define SH_KEY_TYPE int64
#define SH_KEY chunk_id
#define SH_HASH_KEY(tb, key) chunk_hash((uint64) (key))
#define SH_EQUAL(tb, a, b) ((a) == (b))
#define SH_SCOPE static inline
#define SH_DECLARE
#define SH_DEFINE
#include "lib/simplehash.h"

/*
 * Scores by chunk. A query's postings are mostly one collection's, whose chunk ids are
 * close together, so when the ids' range is not much wider than the postings an array
 * indexed by chunk id beats a hash table: each term's postings come in chunk-id order,
 * so it fills in one forward sweep, where a hash table misses the cache on nearly every
 * posting (measured: 30 -> 18 ms for 152,000 postings). Elsewhere, a hash table.
 */
typedef struct Scores
{
	double	   *dense;			/* score of chunk first_chunk + i; 0 for none */
	int64		first_chunk;
	int64		range;
	chunk_scores_hash *sparse;
} Scores;

static inline void
scores_add(Scores *scores, int64 chunk_id, double contribution)
{
	ChunkScore *entry;
	bool		found;

	if (scores->dense != NULL)
	{
		int64		offset = chunk_id - scores->first_chunk;

		/* The range came from the same index under the same snapshot; never write outside. */
		if (unlikely(offset < 0 || offset >= scores->range))
			elog(ERROR, "kb_bm25_top_chunks: chunk %lld is outside the range read first",
				 (long long) chunk_id);
		scores->dense[offset] += contribution;
		return;
	}
	entry = chunk_scores_insert(scores->sparse, chunk_id, &found);
	if (!found)
		entry->score = 0;
	entry->score += contribution;
}

/* a ranks after b: a lower score, or the same score and a larger chunk id (as SQL orders) */
static inline bool
ranks_after(const ChunkScore *a, const ChunkScore *b)
{
	return a->score < b->score || (a->score == b->score && a->chunk_id > b->chunk_id);
}

/* Restore a heap whose root ranks last (the k-th best so far) after replacing the root. */
static void
worst_first_sift_down(ChunkScore *heap, int count, int i)
{
	for (;;)
	{
		int			left = 2 * i + 1;
		int			right = left + 1;
		int			last = i;
		ChunkScore	swap;

		if (left < count && ranks_after(&heap[left], &heap[last]))
			last = left;
		if (right < count && ranks_after(&heap[right], &heap[last]))
			last = right;
		if (last == i)
			return;
		swap = heap[i];
		heap[i] = heap[last];
		heap[last] = swap;
		i = last;
	}
}

static int
rank_order(const void *a, const void *b)
{
	if (ranks_after(a, b))
		return 1;
	if (ranks_after(b, a))
		return -1;
	return 0;
}

static Datum *
array_elements(ArrayType *array, Oid element_type, int *count, const char *name)
{
	int16		typlen;
	bool		typbyval;
	char		typalign;
	Datum	   *elements;
	bool	   *nulls;

	if (ARR_ELEMTYPE(array) != element_type)
		ereport(ERROR, (errcode(ERRCODE_DATATYPE_MISMATCH),
						errmsg("kb_bm25_top_chunks: %s has the wrong element type", name)));
	get_typlenbyvalalign(element_type, &typlen, &typbyval, &typalign);
	deconstruct_array(array, element_type, typlen, typbyval, typalign, &elements, &nulls, count);
	for (int i = 0; i < *count; i++)
		if (nulls[i])
			ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
							errmsg("kb_bm25_top_chunks: %s contains a null", name)));
	return elements;
}

/* The primary key of postings must be the covering B-tree this file reads. */
static void
check_postings_index(Relation index)
{
	static const Oid column_types[POSTING_COLUMNS] = {INT8OID, TEXTOID, INT8OID, INT4OID, INT4OID};
	TupleDesc	desc = RelationGetDescr(index);

	if (index->rd_rel->relam != BTREE_AM_OID
		|| IndexRelationGetNumberOfAttributes(index) != POSTING_COLUMNS
		|| IndexRelationGetNumberOfKeyAttributes(index) != POSTING_KEY_COLUMNS)
		ereport(ERROR, (errcode(ERRCODE_WRONG_OBJECT_TYPE),
						errmsg("kb_bm25_top_chunks: \"%s\" is not a B-tree on (collection_id, lexeme, chunk_id) "
							   "INCLUDE (term_frequency, chunk_length)", RelationGetRelationName(index))));
	for (int i = 0; i < POSTING_COLUMNS; i++)
		if (TupleDescAttr(desc, i)->atttypid != column_types[i])
			ereport(ERROR, (errcode(ERRCODE_DATATYPE_MISMATCH),
							errmsg("kb_bm25_top_chunks: column %d of \"%s\" has an unexpected type",
								   i + 1, RelationGetRelationName(index))));
}

/* Keep `candidate` if it is among the `top` best seen: best[0] is the worst kept. */
static inline void
best_offer(ChunkScore *best, int *kept, int top, int64 chunk_id, double score)
{
	ChunkScore	candidate = {.chunk_id = chunk_id, .score = score};

	if (*kept < top)
	{
		best[(*kept)++] = candidate;
		if (*kept == top)
			for (int i = top / 2 - 1; i >= 0; i--)
				worst_first_sift_down(best, top, i);
	}
	else if (ranks_after(&best[0], &candidate))
	{
		best[0] = candidate;
		worst_first_sift_down(best, top, 0);
	}
}

static void
scan_keys_set(ScanKeyData *keys, Relation index, Datum collection, Datum lexeme)
{
	ScanKeyEntryInitialize(&keys[0], 0, POSTING_COLLECTION + 1, BTEqualStrategyNumber, InvalidOid,
						   index->rd_indcollation[POSTING_COLLECTION], F_INT8EQ, collection);
	ScanKeyEntryInitialize(&keys[1], 0, POSTING_LEXEME + 1, BTEqualStrategyNumber, InvalidOid,
						   index->rd_indcollation[POSTING_LEXEME], F_TEXTEQ, lexeme);
}

/* The chunk id of the term's first or last index entry, visible or not; false if none. */
static bool
edge_chunk(IndexScanDesc scan, ScanKeyData *keys, ScanDirection direction, int64 *chunk_id)
{
	Datum		values[POSTING_COLUMNS];
	bool		isnull[POSTING_COLUMNS];

	index_rescan(scan, keys, 2, NULL, 0);
	if (index_getnext_tid(scan, direction) == NULL || scan->xs_itup == NULL)
		return false;
	index_deform_tuple(scan->xs_itup, scan->xs_itupdesc, values, isnull);
	*chunk_id = DatumGetInt64(values[POSTING_CHUNK]);
	return true;
}

PG_FUNCTION_INFO_V1(kb_bm25_top_chunks);

/*
 * kb_bm25_top_chunks(postings regclass, collection_ids int8[], lexemes text[],
 *                    weights float8[], length_bases float8[], length_slopes float8[],
 *                    expected_chunks int8, top int4)
 * RETURNS TABLE (chunk_id int8, score float8)
 *
 * Term i is (collection_ids[i], lexemes[i]); a posting of it contributes
 *     weights[i] * tf / (tf + length_bases[i] + length_slopes[i] * chunk_length)
 * to its chunk's score. Weights must be positive (BM25's are), so a score of 0 means no
 * posting. Returns the `top` best chunks, best first, ties by chunk id.
 */
Datum
kb_bm25_top_chunks(PG_FUNCTION_ARGS)
{
	Oid			postings_oid = PG_GETARG_OID(0);
	int			terms,
				count;
	Datum	   *collections,
			   *lexemes,
			   *weights,
			   *length_bases,
			   *length_slopes;
	int64		expected = PG_GETARG_INT64(6);
	int32		top = PG_GETARG_INT32(7);
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Relation	heap,
				index;
	IndexScanDesc scan;
	TupleTableSlot *slot;
	Buffer		vmbuffer = InvalidBuffer;
	Snapshot	snapshot = GetActiveSnapshot();
	Scores		scores = {0};
	int64		first_chunk = PG_INT64_MAX,
				last_chunk = PG_INT64_MIN;
	ChunkScore *best;
	int			kept = 0;

	collections = array_elements(PG_GETARG_ARRAYTYPE_P(1), INT8OID, &terms, "collection_ids");
	lexemes = array_elements(PG_GETARG_ARRAYTYPE_P(2), TEXTOID, &count, "lexemes");
	if (count != terms)
		goto mismatch;
	weights = array_elements(PG_GETARG_ARRAYTYPE_P(3), FLOAT8OID, &count, "weights");
	if (count != terms)
		goto mismatch;
	length_bases = array_elements(PG_GETARG_ARRAYTYPE_P(4), FLOAT8OID, &count, "length_bases");
	if (count != terms)
		goto mismatch;
	length_slopes = array_elements(PG_GETARG_ARRAYTYPE_P(5), FLOAT8OID, &count, "length_slopes");
	if (count != terms)
		goto mismatch;
	for (int term = 0; term < terms; term++)
		if (!(DatumGetFloat8(weights[term]) > 0) || isinf(DatumGetFloat8(weights[term])))
			ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
							errmsg("kb_bm25_top_chunks: weights must be positive and finite")));

	InitMaterializedSRF(fcinfo, 0);
	if (terms == 0 || top <= 0)
		return (Datum) 0;

	heap = table_open(postings_oid, AccessShareLock);
	index = index_open(RelationGetPrimaryKeyIndex(heap), AccessShareLock);
	check_postings_index(index);
	slot = table_slot_create(heap, NULL);
	scan = index_beginscan(heap, index, snapshot, 2, 0);
	scan->xs_want_itup = true;

	/* Two index descents per term give the chunk ids' range, which picks the accumulator. */
	for (int term = 0; term < terms; term++)
	{
		ScanKeyData keys[2];
		int64		chunk_id;

		scan_keys_set(keys, index, collections[term], lexemes[term]);
		if (edge_chunk(scan, keys, ForwardScanDirection, &chunk_id))
			first_chunk = Min(first_chunk, chunk_id);
		if (edge_chunk(scan, keys, BackwardScanDirection, &chunk_id))
			last_chunk = Max(last_chunk, chunk_id);
	}
	if (first_chunk <= last_chunk
		&& last_chunk - first_chunk < Min(expected, PG_INT64_MAX / 32) * DENSE_RANGE_PER_POSTING + DENSE_RANGE_FLOOR
		&& last_chunk - first_chunk < (int64) work_mem * 1024 / (int64) sizeof(double))
	{
		scores.first_chunk = first_chunk;
		scores.range = last_chunk - first_chunk + 1;
		scores.dense = palloc0(sizeof(double) * scores.range);
	}
	else
		scores.sparse = chunk_scores_create(CurrentMemoryContext,
											(uint32) Min(Max(expected, 16), MAX_PRESIZED_CHUNKS), NULL);

	for (int term = 0; term < terms && first_chunk <= last_chunk; term++)
	{
		ScanKeyData keys[2];
		ItemPointer tid;
		double		weight = DatumGetFloat8(weights[term]);
		double		length_base = DatumGetFloat8(length_bases[term]);
		double		length_slope = DatumGetFloat8(length_slopes[term]);

		scan_keys_set(keys, index, collections[term], lexemes[term]);
		index_rescan(scan, keys, 2, NULL, 0);

		/* As nodeIndexonlyscan.c: the index tuple has every column; the heap is read only
		 * to check visibility on pages the visibility map does not mark all-visible. */
		while ((tid = index_getnext_tid(scan, ForwardScanDirection)) != NULL)
		{
			Datum		values[POSTING_COLUMNS];
			bool		isnull[POSTING_COLUMNS];
			double		tf;

			CHECK_FOR_INTERRUPTS();
			if (!VM_ALL_VISIBLE(heap, ItemPointerGetBlockNumber(tid), &vmbuffer))
			{
				if (!index_fetch_heap(scan, slot))
					continue;
				ExecClearTuple(slot);
				if (scan->xs_heap_continue)
					elog(ERROR, "kb_bm25_top_chunks: non-MVCC snapshots are not supported");
			}
			else
				PredicateLockPage(heap, ItemPointerGetBlockNumber(tid), snapshot);
			if (scan->xs_itup == NULL)
				elog(ERROR, "kb_bm25_top_chunks: the index returned no index tuple");
			index_deform_tuple(scan->xs_itup, scan->xs_itupdesc, values, isnull);

			/* The same operations in the same order as the SQL, so the same doubles. */
			tf = (double) DatumGetInt32(values[POSTING_TERM_FREQUENCY]);
			scores_add(&scores, DatumGetInt64(values[POSTING_CHUNK]),
					   weight * tf / (tf + length_base + length_slope
									  * (double) DatumGetInt32(values[POSTING_CHUNK_LENGTH])));
		}
	}

	index_endscan(scan);
	if (BufferIsValid(vmbuffer))
		ReleaseBuffer(vmbuffer);
	ExecDropSingleTupleTableSlot(slot);
	index_close(index, AccessShareLock);
	table_close(heap, AccessShareLock);

	/* No more room than there can be chunks: `top` comes from the caller. */
	best = palloc(sizeof(ChunkScore) * Max(1, Min((int64) top, scores.dense != NULL
													 ? scores.range : (int64) scores.sparse->members)));
	if (scores.dense != NULL)
	{
		for (int64 i = 0; i < scores.range; i++)
			if (scores.dense[i] != 0)
				best_offer(best, &kept, top, scores.first_chunk + i, scores.dense[i]);
	}
	else if (scores.sparse != NULL)
	{
		chunk_scores_iterator iterator;
		ChunkScore *entry;

		chunk_scores_start_iterate(scores.sparse, &iterator);
		while ((entry = chunk_scores_iterate(scores.sparse, &iterator)) != NULL)
			best_offer(best, &kept, top, entry->chunk_id, entry->score);
	}
	qsort(best, kept, sizeof(ChunkScore), rank_order);
	for (int i = 0; i < kept; i++)
	{
		Datum		row[2] = {Int64GetDatum(best[i].chunk_id), Float8GetDatum(best[i].score)};
		bool		nulls[2] = {false, false};

		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, row, nulls);
	}
	return (Datum) 0;

mismatch:
	ereport(ERROR, (errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
					errmsg("kb_bm25_top_chunks: the term arrays must have the same length")));
}
