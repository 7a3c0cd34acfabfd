"""Admin for chat: budgets are edited here; conversations and the cache are read and cleared."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

from django.contrib import admin, messages
from django.db.models import Count, Model, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.text import Truncator

from chat import answer_cache, quality, selectors
from chat.models import AnswerCacheEntry, Budget, Conversation, Message

if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations


class _MessageTotal(TypedDict):
    """What ConversationAdmin.get_queryset annotates its rows with."""

    message_total: int


class _ReadOnly:
    """Rows written only by the chat pipeline: visible, never edited by hand."""

    def has_add_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):
    list_display = ["__str__", "scope", "user", "api_key", "daily_token_limit",
                    "daily_cost_limit_usd", "updated_at"]
    list_filter = ["scope"]
    list_select_related = ["user", "api_key"]
    fields = ["scope", "user", "api_key", "daily_token_limit", "daily_cost_limit_usd"]


class MessageInline(_ReadOnly, admin.TabularInline):
    model = Message
    extra = 0
    readonly_fields = ("created_at", "role", "status", "mode", "short_content", "provider",
                       "model", "input_tokens", "output_tokens", "cache_hit")
    fields = readonly_fields
    ordering = ["created_at"]
    show_change_link = True

    @admin.display(description="Content")
    def short_content(self, obj: Message) -> str:
        return Truncator(obj.content).chars(160)


@admin.register(Conversation)
class ConversationAdmin(_ReadOnly, admin.ModelAdmin):
    list_display = ["__str__", "user", "api_key", "collection", "message_count", "updated_at"]
    # Only collections that appear in the rows shown: the full list would name restricted ones.
    list_filter = [("collection", admin.RelatedOnlyFieldListFilter)]
    list_select_related = ["user", "api_key", "collection"]
    search_fields = ["title", "user__username"]
    date_hierarchy = "updated_at"
    inlines = [MessageInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Conversation]:
        # Editors read only what the document admin shows them (collections_visible_to).
        return (
            super().get_queryset(request)
            .filter(pk__in=selectors.conversations_for_admin(user=request.user).values("pk"))
            .annotate(message_total=Count("messages"))
        )

    @admin.display(description="Messages", ordering="message_total")
    def message_count(self, obj: WithAnnotations[Conversation, _MessageTotal]) -> int:
        return obj.message_total


@admin.register(Message)
class MessageAdmin(_ReadOnly, admin.ModelAdmin):
    list_display = ["created_at", "role", "status", "mode", "short_content", "provider", "model",
                    "cache_hit"]
    list_filter = ["role", "status", "mode", "cache_hit", "provider"]
    list_select_related = ["conversation"]
    search_fields = ["content"]
    date_hierarchy = "created_at"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Message]:
        return super().get_queryset(request).filter(
            pk__in=selectors.messages_for_admin(user=request.user).values("pk")
        )

    @admin.display(description="Content")
    def short_content(self, obj: Message) -> str:
        return Truncator(obj.content).chars(100)

    def get_readonly_fields(self, request: HttpRequest, obj: Model | None = None) -> list[str]:
        fields = list(super().get_readonly_fields(request, obj))
        if (isinstance(obj, Message) and obj.role == Message.Role.ASSISTANT
                and request.user.has_perm("search.add_goldenquery")):
            fields.append("golden_set")
        return fields

    @admin.display(description="Golden set")
    def golden_set(self, obj: Message) -> str:
        initial = quality.golden_initial_for_message(obj)
        url = f"{reverse('admin:search_goldenquery_add')}?{urlencode(initial)}"
        return format_html('<a href="{}">Add its question to the golden set</a>', url)


@admin.register(AnswerCacheEntry)
class AnswerCacheEntryAdmin(_ReadOnly, admin.ModelAdmin):
    list_display = ["__str__", "collection", "hits", "cost_usd", "model", "embedding_model",
                    "created_at", "last_hit_at"]
    list_filter = [("collection", admin.RelatedOnlyFieldListFilter), "model"]
    list_select_related = ["collection"]
    search_fields = ["question", "answer"]
    exclude = ["embedding"]
    actions = ["clear"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[AnswerCacheEntry]:
        return super().get_queryset(request).filter(
            pk__in=selectors.answer_cache_entries_for_admin(user=request.user).values("pk")
        )

    @admin.action(description="Clear selected cached answers")
    def clear(self, request: HttpRequest, queryset: QuerySet[AnswerCacheEntry]) -> None:
        deleted = answer_cache.cache_clear(entry_ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"Cleared {deleted} cached answers.", messages.SUCCESS)
