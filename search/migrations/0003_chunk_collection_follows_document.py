"""A chunk's collection is its document's collection, enforced by the database.

kb_chunk.collection_id is denormalised from kb_document so BM25 needs no join. A composite
foreign key (document_id, collection_id) -> kb_document (id, collection_id) makes a chunk
in another collection than its document impossible, whatever code writes the rows, and
ON UPDATE CASCADE moves a document's chunks with it: the cascaded UPDATE of
kb_chunk.collection_id fires the triggers of 0002_bm25_index, which re-tokenise the chunks
with the new collection's text-search configuration and move their postings and both
collections' statistics, in the same transaction as the move.

Rows that already disagree (a document moved in the admin before this fix) are repaired
first, through the same triggers.
"""

from django.db import migrations

FORWARD = r"""
-- ALTER TABLE refuses a table with deferred foreign-key checks still queued in this
-- transaction (the repair below queues some on kb_chunk): run them now.
SET CONSTRAINTS ALL IMMEDIATE;

UPDATE kb_chunk AS c SET collection_id = d.collection_id
FROM kb_document AS d
WHERE d.id = c.document_id AND c.collection_id <> d.collection_id;

ALTER TABLE kb_document
    ADD CONSTRAINT kb_document_id_collection_uniq UNIQUE (id, collection_id);

ALTER TABLE kb_chunk
    ADD CONSTRAINT kb_chunk_document_collection_fk
    FOREIGN KEY (document_id, collection_id) REFERENCES kb_document (id, collection_id)
    ON UPDATE CASCADE DEFERRABLE INITIALLY DEFERRED;
"""

BACKWARD = r"""
SET CONSTRAINTS ALL IMMEDIATE;
ALTER TABLE kb_chunk DROP CONSTRAINT IF EXISTS kb_chunk_document_collection_fk;
ALTER TABLE kb_document DROP CONSTRAINT IF EXISTS kb_document_id_collection_uniq;
"""


class Migration(migrations.Migration):
    dependencies = [
        ("search", "0002_bm25_index"),
        ("kb", "0003_access_control"),
    ]

    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
