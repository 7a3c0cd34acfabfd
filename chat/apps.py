from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        # Imported here, for its registration with kb.dashboard (the usage dashboard's
        # most-cited documents are read from chat's answers): it imports models, which
        # need the app registry ready.
        from chat import selectors  # noqa: F401
