from django.db import migrations


def create_default_collection(apps, schema_editor):
    Collection = apps.get_model("kb", "Collection")
    Collection.objects.get_or_create(
        slug="default",
        defaults={"name": "Default", "description": "Documents uploaded without a collection."},
    )


class Migration(migrations.Migration):
    dependencies = [("kb", "0001_initial")]

    operations = [migrations.RunPython(create_default_collection, migrations.RunPython.noop)]
