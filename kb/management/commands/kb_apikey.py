"""manage.py kb_apikey create --user NAME [--collections SLUG ...]: issue an API key."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from kb.api.ratelimits import rate_limit_parse
from kb.models import Collection
from kb.services import api_keys


class Command(BaseCommand):
    help = ("Create an API key for a user and print it once (only its hash is stored). "
            "The key goes to stdout alone, so KEY=$(manage.py kb_apikey create --user NAME) works.")

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="create")
        create = actions.add_parser("create", help="Create a key and print it once.",
                                    description="Create a key and print it once.")
        create.add_argument("--user", required=True, dest="username",
                            help="The user the key acts as; it reads what they may read.")
        create.add_argument("--collections", nargs="+", default=[], metavar="SLUG",
                            help="Narrow the key to these collections (default: all the user's).")
        create.add_argument("--name", default="", help="A label to tell keys apart in the admin.")
        create.add_argument("--rate-limit", default="",
                            help="This key's own limit, e.g. 600/m (default: KB_RATELIMIT_*).")

    def handle(self, *args: str, username: str, collections: list[str], name: str,
               rate_limit: str, **options: object) -> None:
        user_model = get_user_model()
        try:
            user = user_model.objects.get(**{user_model.USERNAME_FIELD: username})
        except user_model.DoesNotExist:
            raise CommandError(f"No user named {username!r}.") from None
        if not user.is_active:
            raise CommandError(f"{username} is deactivated; a key of theirs would be refused.")
        slugs = list(dict.fromkeys(collections))
        chosen = list(Collection.objects.filter(slug__in=slugs))
        missing = sorted(set(slugs) - {collection.slug for collection in chosen})
        if missing:
            raise CommandError(f"No collection with the slug: {', '.join(missing)}.")
        rate_limit = rate_limit.strip()
        if rate_limit:
            try:
                rate_limit_parse(rate_limit)
            except ValueError:
                raise CommandError("--rate-limit takes N/s, N/m, N/h or N/d, e.g. 600/m.") from None
        try:
            api_key, raw_key = api_keys.api_key_create(
                user=user, name=name or f"{user.get_username()} (command line)",
                collections=chosen, rate_limit=rate_limit,
            )
        except api_keys.ApiKeyError as exc:
            raise CommandError(str(exc)) from None
        scope = ", ".join(c.slug for c in chosen) or "every collection the user may read"
        self.stderr.write(f"Created API key {api_key.prefix}… for {user.get_username()} ({scope}). "
                          "Copy it now, it is not shown again:")
        self.stdout.write(raw_key)
