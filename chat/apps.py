from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        # Both import models, which the app registry allows only once ready (importing them at
        # the top would be a cycle with Django's app registry, which imports this module): the
        # signal receivers of the answer cache, and chat.selectors for its registration with
        # kb.usage.reports (the usage dashboard's most-cited documents are read from answers).
        from chat import selectors  # noqa: F401
        from chat.signals import signals_connect

        signals_connect()
