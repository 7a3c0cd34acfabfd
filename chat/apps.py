from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        # Imported here: selectors import models, which need the app registry ready.
        from chat.selectors import documents_most_cited
        from kb.dashboard import cited_documents_source_set

        # The usage dashboard's most-cited documents are read from chat's answers.
        cited_documents_source_set(documents_most_cited)
