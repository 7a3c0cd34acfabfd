import re

from django.db import migrations, models

# The semantic-cache notice used to quote the earlier question, which may be another
# user's words; stored notices lose the quote.
_QUOTED = re.compile(r"a very similar question \(“.*?”\) over the same documents\.", re.S)
_PLAIN = "a very similar question over the same documents."


def notices_unquote(apps, schema_editor):
    Message = apps.get_model("chat", "Message")
    for message in Message.objects.filter(notice__contains="a very similar question (“").only("pk", "notice"):
        Message.objects.filter(pk=message.pk).update(notice=_QUOTED.sub(_PLAIN, message.notice))


class Migration(migrations.Migration):
    dependencies = [("chat", "0001_initial")]

    operations = [
        migrations.AddField(
            model_name="message",
            name="answerable",
            field=models.BooleanField(blank=True, null=True),
        ),
        migrations.RunPython(notices_unquote, migrations.RunPython.noop),
    ]
