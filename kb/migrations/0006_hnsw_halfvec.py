"""Each embedding model's HNSW index over half-precision vectors (kb.embeddings).

The stored vectors are unchanged; only the index graph holds them as halfvec, at 57% of
the size, with recall@10 and nDCG@10 within 0.001 (docs/RETRIEVAL.md, "Vector search").
An index is built again only where the model has one (a model whose vectors were dropped
has none), and only where pgvector has halfvec (0.7+); queries follow whichever type an
index holds (kb.embeddings.hnsw_vector_type). Inside the migration's transaction the build locks the table: at 100k chunks
it takes about a minute.
"""

from django.db import migrations


def _rebuild(schema_editor, kind: str) -> None:
    with schema_editor.connection.cursor() as cursor:
        # The migration's transaction: SET LOCAL lasts until it ends. Without it the
        # connection's statement timeout (60 s) would cancel the build of a large base.
        cursor.execute("SET LOCAL statement_timeout = 0")
        cursor.execute("SELECT string_to_array(extversion, '.')::int[] >= '{0,7}' "
                       "FROM pg_extension WHERE extname = 'vector'")
        row = cursor.fetchone()
        if kind == "halfvec" and not (row and row[0]):
            return  # pgvector before 0.7 has no halfvec: the indexes stay as they are
        cursor.execute("SELECT id, dimensions FROM kb_embeddingmodel ORDER BY id")
        for model_id, dimensions in cursor.fetchall():
            index = f"kb_chunkembedding_hnsw_{int(model_id)}"
            cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [index])
            if not cursor.fetchone()[0]:
                continue
            cursor.execute(f"DROP INDEX {index}")
            cursor.execute(
                f"CREATE INDEX {index} ON kb_chunkembedding USING hnsw "
                f"((embedding::{kind}({int(dimensions)})) {kind}_cosine_ops) "
                f"WITH (m = 16, ef_construction = 64) "
                f"WHERE embedding_model_id = {int(model_id)}"
            )


def to_halfvec(apps, schema_editor):
    _rebuild(schema_editor, "halfvec")


def to_vector(apps, schema_editor):
    _rebuild(schema_editor, "vector")


class Migration(migrations.Migration):

    dependencies = [
        ('kb', '0005_reindex_status_dropping'),
    ]

    operations = [
        migrations.RunPython(to_halfvec, to_vector),
    ]
