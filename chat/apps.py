from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        # chat.signals imports the models, which the app registry allows only once ready.
        from chat.signals import signals_connect

        signals_connect()
