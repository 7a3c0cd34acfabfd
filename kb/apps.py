from django.apps import AppConfig
from django.conf import settings


class KbConfig(AppConfig):
    name = "kb"
    verbose_name = "Knowledge base"

    def ready(self) -> None:
        # Registers the API-key scheme with drf-spectacular (extensions register on import).
        from kb import schema  # noqa: F401

        if settings.KB_STOP_WITH_PARENT_PID:
            from kb.process_lifetime import process_stop_with_parent

            process_stop_with_parent(parent_pid=settings.KB_STOP_WITH_PARENT_PID)
