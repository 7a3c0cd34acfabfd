"""`manage.py kb_reembed --model KEY [--activate]`: fill a new embedding space, then cut over."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from kb import embeddings
from kb.providers import registry
from kb.services import embedding_models


class Command(BaseCommand):
    help = "Embed every chunk with another configured model while search keeps serving."

    def add_arguments(self, parser: CommandParser) -> None:
        known = ", ".join(registry.embedding_model_keys())
        parser.add_argument("--model", required=True,
                            help=f"A key of KB_PROVIDERS['embedding'] ({known}).")
        parser.add_argument("--activate", action="store_true",
                            help="Switch search to the model once every chunk has a vector in it.")
        parser.add_argument("--sync", action="store_true",
                            help="Run here instead of in the workers.")
        parser.add_argument("--cancel", action="store_true", help="Cancel a running re-embedding.")

    def handle(self, *args: str, model: str, activate: bool, sync: bool, cancel: bool,
               **options: object) -> None:
        if model not in registry.embedding_model_keys():
            raise CommandError(
                f"Unknown model {model!r}; "
                f"configured: {', '.join(registry.embedding_model_keys())}."
            )
        if cancel:
            target = embeddings.embedding_model_register(key=model)
            embeddings.reembed_cancel(model=target)
            self.stdout.write(f"Cancelled re-embedding with {model}.")
            return
        try:
            if sync:
                target = embeddings.reembed_start(key=model)
            else:
                target = embedding_models.reembed_queue(key=model, activate=activate)
        except embeddings.EmbeddingModelError as exc:
            raise CommandError(str(exc)) from None
        if sync:
            target = embeddings.reembed_run(model_id=target.pk, activate=activate)
            self.stdout.write(
                f"{target.key}: {target.chunks_embedded}/{target.chunks_total} chunks, "
                f"status {target.status}."
            )
        else:
            self.stdout.write(
                f"Queued re-embedding with {target.key} ({target.dimensions} dimensions). "
                "Progress is in the admin under Embedding models."
            )
