/*
 * kb_bm25: the exact BM25 top k of a query over the knowledge base's postings index.
 *
 * The same sum as the SQL in search/bm25.py (SqlBM25), computed here because PostgreSQL's
 * executor spends about 0.4 µs on each posting of a GROUP BY over an index-only scan
 * (scan node, join, expression, hash aggregate, sort), and a long query has 100,000
 * postings at 100k chunks. This function walks the primary key of search_posting,
 * (collection_id, lexeme, chunk_id) INCLUDE (term_frequency, chunk_length), as an
 * index-only scan does, about 0.12 µs a posting. It knows nothing of BM25's statistics:
 * the caller passes each term's weight and length normalisation, so the formula lives in
 * one place, and a posting contributes
 *
 *     weight * tf / (tf + length_base + length_slope * chunk_length)  <  weight.
 *
 * MaxScore (Turtle and Flood, 1995), term at a time: terms are read rarest (heaviest)
 * first, every posting added to its chunk. Before each next term, if the weights of the
 * terms left sum to less than θ, the top-th best score so far (a floor for the final
 * top-th score, as scores only grow), no chunk without a posting yet can reach the top,
 * nor one whose score plus that sum stays under θ. The rest, the candidates, get the
 * remaining terms' postings, by index lookups when they are few and otherwise by reading
 * the term's postings and skipping other chunks; after each term θ rises and candidates
 * that can no longer reach it drop out. The result is exactly the unpruned top k.
 *
 * Access: the caller needs SELECT on the postings table, and the table must not be under
 * row-level security (the function reads the index directly, past any policy). EXECUTE
 * is revoked from PUBLIC by the extension script; search.postgres_extension grants it to
 * the role that runs migrate.
 *
 * Versions: PostgreSQL 14 to 18. InitMaterializedSRF exists from 15.1 (materialized_srf
 * below does its work by hand before), and PostgreSQL 18 added index_beginscan's
 * instrumentation argument and RelationGetPrimaryKeyIndex's deferrable_ok.
 */
#include "postgres.h"

#include <math.h>

#include "access/genam.h"
#include "access/relscan.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/visibilitymap.h"
#include "catalog/objectaddress.h"
#include "catalog/pg_am_d.h"
#include "catalog/pg_type.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/bufmgr.h"
#include "storage/predicate.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/rls.h"
#include "utils/snapmgr.h"
#include "utils/tuplestore.h"

PG_MODULE_MAGIC;

#if PG_VERSION_NUM < 140000
#error "kb_bm25 needs PostgreSQL 14 or later"
#endif

#if PG_VERSION_NUM >= 180000
#define KB_INDEX_BEGINSCAN(heap, index, snapshot, nkeys) \
	index_beginscan((heap), (index), (snapshot), NULL, (nkeys), 0)
#define KB_PRIMARY_KEY_INDEX(heap) RelationGetPrimaryKeyIndex((heap), false)
#else
#define KB_INDEX_BEGINSCAN(heap, index, snapshot, nkeys) \
	index_beginscan((heap), (index), (snapshot), (nkeys), 0)
#define KB_PRIMARY_KEY_INDEX(heap) RelationGetPrimaryKeyIndex(heap)
#endif

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
/* An index lookup of one chunk's posting costs about as much as reading this many
 * postings in a row (measured on the 100k-chunk benchmark). */
#define LOOKUP_POSTINGS 12
/* The most chunks one call returns: the buffer for them is allocated up front. */
#define MAX_TOP 100000
/* Bounds are compared with room for rounding: a pruned chunk must be out by a margin. */
#define BOUND_SLACK(bound) ((bound) * (1 + 1e-9) + 1e-12)

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
	bool		candidate;
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
	bool	   *dense_candidate;
	int64		first_chunk;
	int64		range;
	chunk_scores_hash *sparse;
	double		highest;		/* the best score so far */
} Scores;

typedef struct Term
{
	Datum		collection;
	Datum		lexeme;
	int64		document_frequency;
	double		weight;
	double		length_base;
	double		length_slope;
} Term;

/* What reading postings needs, as nodeIndexonlyscan.c has it. */
typedef struct PostingReader
{
	Relation	heap;
	Relation	index;
	IndexScanDesc term_scan;	/* by (collection, lexeme) */
	IndexScanDesc chunk_scan;	/* by (collection, lexeme, chunk) */
	TupleTableSlot *slot;
	Buffer		vmbuffer;
	Snapshot	snapshot;
} PostingReader;

static inline double *
dense_slot(Scores *scores, int64 chunk_id)
{
	int64		offset = chunk_id - scores->first_chunk;

	/* The range came from the same index under the same snapshot; never write outside. */
	if (unlikely(offset < 0 || offset >= scores->range))
		elog(ERROR, "kb_bm25_top_chunks: chunk %lld is outside the range read first",
			 (long long) chunk_id);
	return &scores->dense[offset];
}

static inline void
scores_add(Scores *scores, int64 chunk_id, double contribution)
{
	double	   *score;
	ChunkScore *entry;
	bool		found;

	if (scores->dense != NULL)
		score = dense_slot(scores, chunk_id);
	else
	{
		entry = chunk_scores_insert(scores->sparse, chunk_id, &found);
		if (!found)
		{
			entry->score = 0;
			entry->candidate = false;
		}
		score = &entry->score;
	}
	*score += contribution;
	if (*score > scores->highest)
		scores->highest = *score;
}

/* The chunk's score if it is a candidate, else NULL. */
static inline double *
candidate_score(Scores *scores, int64 chunk_id)
{
	ChunkScore *entry;

	if (scores->dense != NULL)
	{
		int64		offset = chunk_id - scores->first_chunk;

		return offset >= 0 && offset < scores->range && scores->dense_candidate[offset]
			? &scores->dense[offset] : NULL;
	}
	entry = chunk_scores_lookup(scores->sparse, chunk_id);
	return entry != NULL && entry->candidate ? &entry->score : NULL;
}

static void
candidate_mark(Scores *scores, int64 chunk_id, bool candidate)
{
	if (scores->dense != NULL)
		scores->dense_candidate[chunk_id - scores->first_chunk] = candidate;
	else
		chunk_scores_lookup(scores->sparse, chunk_id)->candidate = candidate;
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

/* The `top` best of a stream of chunks: best[0] is the worst kept once `top` are kept. */
typedef struct Best
{
	ChunkScore *kept;
	int			count;
	int			top;
} Best;

static inline void
best_offer(Best *best, int64 chunk_id, double score)
{
	ChunkScore	candidate = {.chunk_id = chunk_id, .score = score};

	if (best->count < best->top)
	{
		best->kept[best->count++] = candidate;
		if (best->count == best->top)
			for (int i = best->top / 2 - 1; i >= 0; i--)
				worst_first_sift_down(best->kept, best->top, i);
	}
	else if (ranks_after(&best->kept[0], &candidate))
	{
		best->kept[0] = candidate;
		worst_first_sift_down(best->kept, best->top, 0);
	}
}

/* The top-th best score offered, or 0 while fewer than `top` were. */
static inline double
best_floor(const Best *best)
{
	return best->count == best->top ? best->kept[0].score : 0;
}

/* Every chunk with a score, offered to `best`. */
static void
best_of_all(Best *best, Scores *scores)
{
	best->count = 0;
	if (scores->dense != NULL)
	{
		for (int64 i = 0; i < scores->range; i++)
			if (scores->dense[i] != 0)
				best_offer(best, scores->first_chunk + i, scores->dense[i]);
	}
	else
	{
		chunk_scores_iterator iterator;
		ChunkScore *entry;

		chunk_scores_start_iterate(scores->sparse, &iterator);
		while ((entry = chunk_scores_iterate(scores->sparse, &iterator)) != NULL)
			best_offer(best, entry->chunk_id, entry->score);
	}
}

static Datum *
array_elements(ArrayType *array, Oid element_type, int expected, const char *name)
{
	int16		typlen;
	bool		typbyval;
	char		typalign;
	Datum	   *elements;
	bool	   *nulls;
	int			count;

	if (ARR_ELEMTYPE(array) != element_type)
		ereport(ERROR, (errcode(ERRCODE_DATATYPE_MISMATCH),
						errmsg("kb_bm25_top_chunks: %s has the wrong element type", name)));
	get_typlenbyvalalign(element_type, &typlen, &typbyval, &typalign);
	deconstruct_array(array, element_type, typlen, typbyval, typalign, &elements, &nulls, &count);
	if (expected >= 0 && count != expected)
		ereport(ERROR, (errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
						errmsg("kb_bm25_top_chunks: the term arrays must have the same length")));
	for (int i = 0; i < count; i++)
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

static int
heaviest_first(const void *a, const void *b)
{
	double		x = ((const Term *) a)->weight,
				y = ((const Term *) b)->weight;

	return x > y ? -1 : x < y ? 1 : 0;
}

/* Position `scan` on the term's postings, or on one chunk's posting of it. */
static void
postings_seek(PostingReader *reader, IndexScanDesc scan, const Term *term, const int64 *chunk_id)
{
	ScanKeyData keys[3];
	Relation	index = reader->index;

	ScanKeyEntryInitialize(&keys[0], 0, POSTING_COLLECTION + 1, BTEqualStrategyNumber, InvalidOid,
						   index->rd_indcollation[POSTING_COLLECTION], F_INT8EQ, term->collection);
	ScanKeyEntryInitialize(&keys[1], 0, POSTING_LEXEME + 1, BTEqualStrategyNumber, InvalidOid,
						   index->rd_indcollation[POSTING_LEXEME], F_TEXTEQ, term->lexeme);
	if (chunk_id != NULL)
		ScanKeyEntryInitialize(&keys[2], 0, POSTING_CHUNK + 1, BTEqualStrategyNumber, InvalidOid,
							   index->rd_indcollation[POSTING_CHUNK], F_INT8EQ, Int64GetDatum(*chunk_id));
	index_rescan(scan, keys, chunk_id != NULL ? 3 : 2, NULL, 0);
}

/*
 * The next posting `scan` finds that this snapshot sees: as nodeIndexonlyscan.c, the
 * index tuple has every column, and the heap is read only to check visibility on pages
 * the visibility map does not mark all-visible.
 */
static inline bool
posting_next(PostingReader *reader, IndexScanDesc scan, int64 *chunk_id, double *tf, double *chunk_length)
{
	ItemPointer tid;
	Datum		values[POSTING_COLUMNS];
	bool		isnull[POSTING_COLUMNS];

	while ((tid = index_getnext_tid(scan, ForwardScanDirection)) != NULL)
	{
		CHECK_FOR_INTERRUPTS();
		if (!VM_ALL_VISIBLE(reader->heap, ItemPointerGetBlockNumber(tid), &reader->vmbuffer))
		{
			if (!index_fetch_heap(scan, reader->slot))
				continue;
			ExecClearTuple(reader->slot);
			if (scan->xs_heap_continue)
				elog(ERROR, "kb_bm25_top_chunks: non-MVCC snapshots are not supported");
		}
		else
			PredicateLockPage(reader->heap, ItemPointerGetBlockNumber(tid), reader->snapshot);
		if (scan->xs_itup == NULL)
			elog(ERROR, "kb_bm25_top_chunks: the index returned no index tuple");
		index_deform_tuple(scan->xs_itup, scan->xs_itupdesc, values, isnull);
		*chunk_id = DatumGetInt64(values[POSTING_CHUNK]);
		*tf = (double) DatumGetInt32(values[POSTING_TERM_FREQUENCY]);
		*chunk_length = (double) DatumGetInt32(values[POSTING_CHUNK_LENGTH]);
		return true;
	}
	return false;
}

/* The same operations in the same order as the SQL, so the same doubles. */
static inline double
contribution(const Term *term, double tf, double chunk_length)
{
	return term->weight * tf / (tf + term->length_base + term->length_slope * chunk_length);
}

/* The chunk id of the term's first or last index entry, visible or not; false if none. */
static bool
edge_chunk(PostingReader *reader, const Term *term, ScanDirection direction, int64 *chunk_id)
{
	Datum		values[POSTING_COLUMNS];
	bool		isnull[POSTING_COLUMNS];

	postings_seek(reader, reader->term_scan, term, NULL);
	if (index_getnext_tid(reader->term_scan, direction) == NULL || reader->term_scan->xs_itup == NULL)
		return false;
	index_deform_tuple(reader->term_scan->xs_itup, reader->term_scan->xs_itupdesc, values, isnull);
	*chunk_id = DatumGetInt64(values[POSTING_CHUNK]);
	return true;
}

/* Two index descents per term give the chunk ids' range, which picks the accumulator. */
static void
scores_init(Scores *scores, PostingReader *reader, const Term *terms, int count)
{
	int64		first_chunk = PG_INT64_MAX,
				last_chunk = PG_INT64_MIN,
				postings = 0;

	for (int i = 0; i < count; i++)
	{
		int64		chunk_id;

		postings += Min(terms[i].document_frequency, PG_INT64_MAX / 64 / count);
		if (edge_chunk(reader, &terms[i], ForwardScanDirection, &chunk_id))
			first_chunk = Min(first_chunk, chunk_id);
		if (edge_chunk(reader, &terms[i], BackwardScanDirection, &chunk_id))
			last_chunk = Max(last_chunk, chunk_id);
	}
	memset(scores, 0, sizeof(Scores));
	if (first_chunk <= last_chunk
		&& last_chunk - first_chunk < postings * DENSE_RANGE_PER_POSTING + DENSE_RANGE_FLOOR
		&& last_chunk - first_chunk < (int64) work_mem * 1024 / (int64) sizeof(double))
	{
		scores->first_chunk = first_chunk;
		scores->range = last_chunk - first_chunk + 1;
		scores->dense = palloc0(sizeof(double) * scores->range);
		scores->dense_candidate = palloc0(sizeof(bool) * scores->range);
	}
	else
		scores->sparse = chunk_scores_create(CurrentMemoryContext,
											 (uint32) Min(Max(postings, 16), MAX_PRESIZED_CHUNKS), NULL);
}

/* The set-returning call's tuplestore, as InitMaterializedSRF(fcinfo, 0) sets it up. */
static void
materialized_srf(FunctionCallInfo fcinfo)
{
#if PG_VERSION_NUM >= 150001
	InitMaterializedSRF(fcinfo, 0);
#else
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	TupleDesc	desc;
	MemoryContext per_query,
				previous;

	if (rsinfo == NULL || !IsA(rsinfo, ReturnSetInfo))
		ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						errmsg("set-valued function called in context that cannot accept a set")));
	if (!(rsinfo->allowedModes & SFRM_Materialize))
		ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						errmsg("materialize mode required, but it is not allowed in this context")));
	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "kb_bm25_top_chunks: return type must be a row type");
	per_query = rsinfo->econtext->ecxt_per_query_memory;
	previous = MemoryContextSwitchTo(per_query);
	rsinfo->returnMode = SFRM_Materialize;
	rsinfo->setResult = tuplestore_begin_heap(true, false, work_mem);
	rsinfo->setDesc = CreateTupleDescCopy(desc);
	MemoryContextSwitchTo(previous);
#endif
}

/*
 * The caller may read the postings table: SELECT on it, and no row-level security, which
 * reading its index directly would bypass. A regclass argument is only a name; without
 * this, any role allowed to EXECUTE could read any table of the right shape.
 */
static void
check_postings_access(Oid relid)
{
	AclResult	result = pg_class_aclcheck(relid, GetUserId(), ACL_SELECT);

	if (result != ACLCHECK_OK)
		aclcheck_error(result, get_relkind_objtype(get_rel_relkind(relid)), get_rel_name(relid));
	if (check_enable_rls(relid, InvalidOid, false) == RLS_ENABLED)
		ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						errmsg("kb_bm25_top_chunks: \"%s\" has row-level security, which this function cannot apply",
							   get_rel_name(relid))));
}

PG_FUNCTION_INFO_V1(kb_bm25_top_chunks);

/*
 * kb_bm25_top_chunks(postings regclass, collection_ids int8[], lexemes text[],
 *                    document_frequencies int8[], weights float8[],
 *                    length_bases float8[], length_slopes float8[], top int4)
 * RETURNS TABLE (chunk_id int8, score float8)
 *
 * Term i is (collection_ids[i], lexemes[i]), with document_frequencies[i] postings (an
 * estimate is fine: it only decides how to read); a posting of it contributes
 *     weights[i] * tf / (tf + length_bases[i] + length_slopes[i] * chunk_length)
 * to its chunk's score. Weights must be positive and the other two not negative (BM25's
 * are), so a contribution is below its weight and a score of 0 means no posting.
 * Returns the `top` best chunks, best first, ties by chunk id.
 */
Datum
kb_bm25_top_chunks(PG_FUNCTION_ARGS)
{
	int			count;
	Datum	   *collections,
			   *lexemes,
			   *frequencies,
			   *weights,
			   *bases,
			   *slopes;
	int32		top = PG_GETARG_INT32(7);
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Term	   *terms;
	double	   *bound_from;		/* bound_from[i]: the sum of the weights of terms i.. */
	PostingReader reader = {0};
	Scores		scores;
	Best		best;
	int64	   *candidates = NULL;
	int64		candidate_count = 0;
	double		floor = 0;
	int			next = 0;

	collections = array_elements(PG_GETARG_ARRAYTYPE_P(1), INT8OID, -1, "collection_ids");
	count = ArrayGetNItems(ARR_NDIM(PG_GETARG_ARRAYTYPE_P(1)), ARR_DIMS(PG_GETARG_ARRAYTYPE_P(1)));
	lexemes = array_elements(PG_GETARG_ARRAYTYPE_P(2), TEXTOID, count, "lexemes");
	frequencies = array_elements(PG_GETARG_ARRAYTYPE_P(3), INT8OID, count, "document_frequencies");
	weights = array_elements(PG_GETARG_ARRAYTYPE_P(4), FLOAT8OID, count, "weights");
	bases = array_elements(PG_GETARG_ARRAYTYPE_P(5), FLOAT8OID, count, "length_bases");
	slopes = array_elements(PG_GETARG_ARRAYTYPE_P(6), FLOAT8OID, count, "length_slopes");

	terms = palloc(sizeof(Term) * Max(count, 1));
	for (int i = 0; i < count; i++)
	{
		terms[i] = (Term) {
			.collection = collections[i], .lexeme = lexemes[i],
			.document_frequency = Max(DatumGetInt64(frequencies[i]), 0),
			.weight = DatumGetFloat8(weights[i]), .length_base = DatumGetFloat8(bases[i]),
			.length_slope = DatumGetFloat8(slopes[i]),
		};
		if (!(terms[i].weight > 0) || isinf(terms[i].weight)
			|| !(terms[i].length_base >= 0) || !(terms[i].length_slope >= 0))
			ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
							errmsg("kb_bm25_top_chunks: weights must be positive and finite, "
								   "length bases and slopes not negative")));
	}

	if (top > MAX_TOP)
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						errmsg("kb_bm25_top_chunks: top must be at most %d", MAX_TOP)));

	materialized_srf(fcinfo);
	if (count == 0 || top <= 0)
		return (Datum) 0;

	qsort(terms, count, sizeof(Term), heaviest_first);
	bound_from = palloc(sizeof(double) * (count + 1));
	bound_from[count] = 0;
	for (int i = count - 1; i >= 0; i--)
		bound_from[i] = bound_from[i + 1] + terms[i].weight;

	/* Before any lock is taken on a table the caller may not read. */
	check_postings_access(PG_GETARG_OID(0));
	reader.heap = table_open(PG_GETARG_OID(0), AccessShareLock);
	if (!OidIsValid(KB_PRIMARY_KEY_INDEX(reader.heap)))
		ereport(ERROR, (errcode(ERRCODE_WRONG_OBJECT_TYPE),
						errmsg("kb_bm25_top_chunks: \"%s\" has no primary key", RelationGetRelationName(reader.heap))));
	reader.index = index_open(KB_PRIMARY_KEY_INDEX(reader.heap), AccessShareLock);
	check_postings_index(reader.index);
	reader.snapshot = GetActiveSnapshot();
	reader.slot = table_slot_create(reader.heap, NULL);
	reader.vmbuffer = InvalidBuffer;
	reader.term_scan = KB_INDEX_BEGINSCAN(reader.heap, reader.index, reader.snapshot, 2);
	reader.term_scan->xs_want_itup = true;
	reader.chunk_scan = KB_INDEX_BEGINSCAN(reader.heap, reader.index, reader.snapshot, 3);
	reader.chunk_scan->xs_want_itup = true;

	scores_init(&scores, &reader, terms, count);
	best.top = top;
	best.kept = palloc(sizeof(ChunkScore) * top);

	/* Essential terms: every posting counts, until the rest cannot lift a new chunk to θ. */
	for (; next < count; next++)
	{
		int64		chunk_id;
		double		tf,
					chunk_length;

		if (next > 0 && BOUND_SLACK(bound_from[next]) < scores.highest)
		{
			best_of_all(&best, &scores);
			floor = best_floor(&best);
			if (BOUND_SLACK(bound_from[next]) < floor)
				break;
		}
		postings_seek(&reader, reader.term_scan, &terms[next], NULL);
		while (posting_next(&reader, reader.term_scan, &chunk_id, &tf, &chunk_length))
			scores_add(&scores, chunk_id, contribution(&terms[next], tf, chunk_length));
	}

	if (next < count)
	{
		/* The candidates: chunks that can still reach θ with every remaining term. */
		double		bound = BOUND_SLACK(bound_from[next]);

		candidates = palloc(sizeof(int64) * Max(best.count, 1));
		if (scores.dense != NULL)
		{
			/* Few enough to list: each is at least θ - bound, and θ > bound. */
			int64		capacity = best.count;

			for (int64 i = 0; i < scores.range; i++)
				if (scores.dense[i] != 0 && scores.dense[i] + bound >= floor)
				{
					if (candidate_count == capacity)
					{
						capacity *= 2;
						candidates = repalloc_huge(candidates, sizeof(int64) * capacity);
					}
					candidates[candidate_count++] = scores.first_chunk + i;
					scores.dense_candidate[i] = true;
				}
		}
		else
		{
			chunk_scores_iterator iterator;
			ChunkScore *entry;
			int64		capacity = best.count;

			chunk_scores_start_iterate(scores.sparse, &iterator);
			while ((entry = chunk_scores_iterate(scores.sparse, &iterator)) != NULL)
				if (entry->score + bound >= floor)
				{
					if (candidate_count == capacity)
					{
						capacity *= 2;
						candidates = repalloc_huge(candidates, sizeof(int64) * capacity);
					}
					candidates[candidate_count++] = entry->chunk_id;
					entry->candidate = true;
				}
		}

		/* Non-essential terms, heaviest first: only the candidates' postings. */
		for (; next < count; next++)
		{
			const Term *term = &terms[next];
			int64		chunk_id,
						kept = 0;
			double		tf,
						chunk_length,
					   *score;

			if ((double) candidate_count * LOOKUP_POSTINGS < (double) term->document_frequency)
			{
				for (int64 i = 0; i < candidate_count; i++)
				{
					score = candidate_score(&scores, candidates[i]);
					postings_seek(&reader, reader.chunk_scan, term, &candidates[i]);
					if (posting_next(&reader, reader.chunk_scan, &chunk_id, &tf, &chunk_length))
						*score += contribution(term, tf, chunk_length);
				}
			}
			else
			{
				postings_seek(&reader, reader.term_scan, term, NULL);
				while (posting_next(&reader, reader.term_scan, &chunk_id, &tf, &chunk_length))
					if ((score = candidate_score(&scores, chunk_id)) != NULL)
						*score += contribution(term, tf, chunk_length);
			}

			/* θ rises with the candidates' scores; those that cannot reach it drop out. */
			best.count = 0;
			for (int64 i = 0; i < candidate_count; i++)
				best_offer(&best, candidates[i], *candidate_score(&scores, candidates[i]));
			floor = Max(floor, best_floor(&best));
			bound = next + 1 < count ? BOUND_SLACK(bound_from[next + 1]) : 0;
			for (int64 i = 0; i < candidate_count; i++)
			{
				if (*candidate_score(&scores, candidates[i]) + bound >= floor)
					candidates[kept++] = candidates[i];
				else
					candidate_mark(&scores, candidates[i], false);
			}
			candidate_count = kept;
		}
		best.count = 0;
		for (int64 i = 0; i < candidate_count; i++)
			best_offer(&best, candidates[i], *candidate_score(&scores, candidates[i]));
	}
	else
		best_of_all(&best, &scores);

	index_endscan(reader.term_scan);
	index_endscan(reader.chunk_scan);
	if (BufferIsValid(reader.vmbuffer))
		ReleaseBuffer(reader.vmbuffer);
	ExecDropSingleTupleTableSlot(reader.slot);
	index_close(reader.index, AccessShareLock);
	table_close(reader.heap, AccessShareLock);

	qsort(best.kept, best.count, sizeof(ChunkScore), rank_order);
	for (int i = 0; i < best.count; i++)
	{
		Datum		row[2] = {Int64GetDatum(best.kept[i].chunk_id), Float8GetDatum(best.kept[i].score)};
		bool		nulls[2] = {false, false};

		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, row, nulls);
	}
	return (Datum) 0;
}
