from django.apps import AppConfig


class KbConfig(AppConfig):
    name = "kb"
    verbose_name = "Knowledge base"

    def ready(self) -> None:
        # Registers the API-key scheme with drf-spectacular (extensions register on import).
        from kb import schema  # noqa: F401
