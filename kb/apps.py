from django.apps import AppConfig
from django.conf import settings

from kb.ops.process_lifetime import process_stop_with_parent


class KbConfig(AppConfig):
    name = "kb"
    verbose_name = "Knowledge base"

    def ready(self) -> None:
        # Registers the API-key scheme with drf-spectacular (extensions register on import).
        # Here, not at the top: it imports models, a cycle with Django's app registry, which
        # imports this module while it is being populated.
        from kb.api import schema  # noqa: F401

        if settings.KB_STOP_WITH_PARENT_PID:
            process_stop_with_parent(parent_pid=settings.KB_STOP_WITH_PARENT_PID)
