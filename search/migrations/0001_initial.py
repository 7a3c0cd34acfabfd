import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = [
        ("kb", "0001_initial"),
    ]

    operations = [
        migrations.CreateModel(
            name="CollectionStatistic",
            fields=[
                ("collection", models.OneToOneField(on_delete=django.db.models.deletion.CASCADE, primary_key=True, related_name="bm25_statistic", serialize=False, to="kb.collection")),
                ("chunk_count", models.BigIntegerField(default=0)),
                ("total_length", models.BigIntegerField(default=0)),
            ],
        ),
        migrations.CreateModel(
            name="TermStatistic",
            fields=[
                ("pk", models.CompositePrimaryKey("collection_id", "lexeme", blank=True, editable=False, primary_key=True, serialize=False)),
                ("lexeme", models.TextField()),
                ("document_frequency", models.BigIntegerField(default=0)),
                ("collection", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="+", to="kb.collection")),
            ],
        ),
        # The table itself is created by 0002_bm25_index with a covering primary key
        # that Django cannot express; this only records the model in the migration state.
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="Posting",
                    fields=[
                        ("pk", models.CompositePrimaryKey("collection_id", "lexeme", "chunk_id", blank=True, editable=False, primary_key=True, serialize=False)),
                        ("collection_id", models.BigIntegerField()),
                        ("lexeme", models.TextField()),
                        ("chunk_id", models.BigIntegerField()),
                        ("term_frequency", models.IntegerField()),
                        ("chunk_length", models.IntegerField()),
                    ],
                    options={"db_table": "search_posting"},
                ),
            ],
            database_operations=[],
        ),
    ]
