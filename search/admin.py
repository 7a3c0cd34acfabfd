"""Admin for golden sets: editors mark real questions with the documents that answer them."""

from __future__ import annotations

import contextlib
import uuid

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest

from kb.models import Collection, Document
from kb.selectors import collections_visible
from search.golden import golden_set_touch
from search.models import GoldenQuery


class GoldenQueryForm(forms.ModelForm):
    class Meta:
        model = GoldenQuery
        fields = ["collection", "question", "documents"]

    def clean(self) -> dict:
        cleaned = super().clean() or {}
        collection: Collection | None = cleaned.get("collection")
        strays = [str(d) for d in cleaned.get("documents") or []
                  if collection is not None and d.collection_id != collection.pk]
        if strays:
            raise forms.ValidationError(
                f"These documents are not in {collection}: {', '.join(strays)}.")
        return cleaned


@admin.register(GoldenQuery)
class GoldenQueryAdmin(admin.ModelAdmin):
    form = GoldenQueryForm
    list_display = ["question", "collection", "document_count", "created_by", "updated_at"]
    list_filter = [("collection", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["question"]
    fields = ["collection", "question", "documents"]
    filter_horizontal = ["documents"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[GoldenQuery]:
        return (super().get_queryset(request)
                .filter(collection__in=collections_visible(user=request.user))
                .select_related("collection", "created_by"))

    def formfield_for_foreignkey(self, db_field, request: HttpRequest, **kwargs):
        if db_field.name == "collection":
            kwargs["queryset"] = collections_visible(user=request.user).order_by("name")
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def formfield_for_manytomany(self, db_field, request: HttpRequest, **kwargs):
        if db_field.name == "documents":
            documents = Document.objects.filter(
                collection__in=collections_visible(user=request.user),
                status=Document.Status.READY).select_related("collection")
            # Opened for one collection (the Quality screen's link): only its documents.
            collection = request.GET.get("collection", "")
            if collection.isdigit():
                documents = documents.filter(collection_id=int(collection))
            kwargs["queryset"] = documents
        return super().formfield_for_manytomany(db_field, request, **kwargs)

    @admin.display(description="Documents")
    def document_count(self, obj: GoldenQuery) -> int:
        return obj.documents.count()

    def save_model(self, request: HttpRequest, obj: GoldenQuery, form: ModelForm,
                   change: bool) -> None:
        if not change:
            obj.created_by = request.user  # type: ignore[assignment]
            # From the Quality screen's "Add to golden set" link: the answer it came from.
            with contextlib.suppress(ValueError):
                obj.source_message_id = uuid.UUID(request.GET.get("source_message", ""))
        super().save_model(request, obj, form, change)

    def save_related(self, request: HttpRequest, form: ModelForm, formsets, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        golden_set_touch(collection=form.instance.collection)

    def delete_model(self, request: HttpRequest, obj: GoldenQuery) -> None:
        collection = obj.collection
        super().delete_model(request, obj)
        golden_set_touch(collection=collection)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[GoldenQuery]) -> None:
        collections = {query.collection for query in queryset}
        super().delete_queryset(request, queryset)
        for collection in collections:
            golden_set_touch(collection=collection)
