from django.db import migrations, models


class Migration(migrations.Migration):
    """A collection's queued re-index status, and the dropping status of an embedding model
    whose vectors are being deleted in a queued task."""

    dependencies = [
        ('kb', '0004_apikey_manage_all_permission'),
    ]

    operations = [
        migrations.AddField(
            model_name='collection',
            name='reindex_status',
            field=models.CharField(choices=[('current', 'Up to date'), ('queued', 'Re-index queued'), ('running', 'Re-indexing'), ('failed', 'Re-index failed')], default='current', max_length=16),
        ),
        migrations.AddField(
            model_name='collection',
            name='reindex_error',
            field=models.TextField(blank=True),
        ),
        migrations.AlterField(
            model_name='embeddingmodel',
            name='status',
            field=models.CharField(choices=[('building', 'Building'), ('ready', 'Ready (complete, not active)'), ('active', 'Active'), ('cancelled', 'Cancelled'), ('retired', 'Retired'), ('dropping', 'Dropping vectors')], default='building', max_length=16),
        ),
    ]
