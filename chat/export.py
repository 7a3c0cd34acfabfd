"""A conversation as a Markdown document, for people to keep or share outside the product.

The JSON export is the API's own representation (chat.api.ConversationSerializer); this is
its readable twin: each turn under a heading, and each answer's cited sources listed after
it with their links, so that the document stands on its own.
"""

from __future__ import annotations

from collections.abc import Iterable

from chat.models import Conversation, Message

ROLE_HEADINGS: dict[str, str] = {Message.Role.USER: "Question", Message.Role.ASSISTANT: "Answer"}


def conversation_markdown(*, conversation: Conversation, messages: Iterable[Message],
                          base_url: str = "") -> str:
    """The conversation as Markdown; source links are made absolute with base_url."""
    lines = [f"# {conversation.title or 'Conversation'}", ""]
    collection = conversation.collection.name if conversation.collection else "all collections"
    lines += [f"*{collection}, {conversation.created_at:%Y-%m-%d %H:%M} UTC*", ""]
    for message in messages:
        role = str(message.role)
        lines += [f"## {ROLE_HEADINGS.get(role, role.title())}", "",
                  message.content.strip() or "*(no text)*", ""]
        cited = set(message.cited or [])
        sources = [c for c in (message.citations or [])
                   if message.answerable is not False and c.get("n") in cited]
        if sources:
            lines += ["Sources:", ""]
            for citation in sources:
                title = citation.get("document_title") or citation.get("document") or "source"
                url = citation.get("url") or ""
                link = f"[{title}]({base_url}{url})" if url else title
                lines.append(f"{citation.get('n')}. {link}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
