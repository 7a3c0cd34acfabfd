"""The editors' admin: upload, watch progress, preview chunks, reprocess, re-embed.

Admin classes stay declarative; every action queues a service and returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict, cast

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.core.files.uploadedfile import UploadedFile
from django.db.models import F, Model, Q, QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.urls.resolvers import URLPattern
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import ngettext

from kb import embeddings, selectors
from kb.api import key_access
from kb.api.ratelimits import rate_limit_parse
from kb.ingestion import sniff
from kb.models import ApiKey, Chunk, Collection, Document, EmbeddingModel, UsageRecord
from kb.providers import registry
from kb.selectors import AnyUser
from kb.services import api_keys, collections, documents, embedding_models, uploads
from search.models import QualityGateRun
from search.quality_gate import quality_gate_latest

if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations

# Short names for the document list; any other type shows as it is.
DOCUMENT_KINDS = {
    sniff.PDF_MIME: "PDF", sniff.DOCX_MIME: "DOCX", sniff.HTML_MIME: "HTML",
    sniff.MARKDOWN_MIME: "Markdown", sniff.TEXT_MIME: "Text", sniff.ZIP_MIME: "Zip",
}


def _elapsed(document: Document) -> str:
    if not document.processing_started_at:
        return ""
    end = document.processing_finished_at or timezone.now()
    seconds = max(0, int((end - document.processing_started_at).total_seconds()))
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def chunk_count_text(count: int) -> str:
    return ngettext("%(count)s chunk", "%(count)s chunks", count) % {"count": f"{count:,}"}


def document_progress_text(document: Document) -> str:
    """The progress cell's words: the stage, then chunks once there are any, then the time."""
    if document.status == Document.Status.FAILED:
        return document.error_message[:200]
    elapsed = _elapsed(document)
    if document.status in {Document.Status.PENDING, Document.Status.PROCESSING}:
        stage = document.get_stage_display()
        if document.chunks_total:
            progress = f"{document.chunks_embedded:,}/{chunk_count_text(document.chunks_total)}"
            return f"{stage}: {progress}, {elapsed}" if elapsed else f"{stage}: {progress}"
        return f"{stage}, {elapsed}" if elapsed else stage
    if not document.chunks_total:
        return ""
    embedded = f"{chunk_count_text(document.chunks_total)} embedded"
    return f"{embedded} in {elapsed}" if elapsed else embedded


def document_progress_payload(document: Document) -> dict:
    """What the admin shows of a document's progress; also served as JSON for polling."""
    return {
        "id": document.pk,
        "title": document.title or document.original_filename,
        "status": document.status,
        "status_label": document.get_status_display(),
        "stage": document.get_stage_display(),
        "chunks_embedded": document.chunks_embedded,
        "chunks_total": document.chunks_total,
        "elapsed": _elapsed(document),
        "error": document.error_message,
        "active": document.status in {Document.Status.PENDING, Document.Status.PROCESSING},
        # The cell's text, worded here once (plurals included) for the page and the poller.
        "text": document_progress_text(document),
    }


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


class CollectionForm(forms.ModelForm):
    class Meta:
        model = Collection
        fields = ["name", "slug", "description", "text_search_config", "is_public",
                  "allowed_users", "allowed_groups"]
        labels = {"is_public": "Public", "allowed_users": "Users who may read it",
                  "allowed_groups": "Groups who may read it"}
        help_texts = {
            "is_public": "Readable by every signed-in user and API key. Untick to restrict it "
                         "to the users and groups below (superusers always see it).",
            "allowed_users": "Only used when the collection is not public.",
            "allowed_groups": "Only used when the collection is not public; every member "
                              "of a group chosen here may read it.",
        }

    def clean_text_search_config(self) -> str:
        value = self.cleaned_data["text_search_config"]
        available = selectors.text_search_configs()
        if value not in available:
            raise forms.ValidationError(
                f"Unknown text-search configuration. Available: {', '.join(sorted(available))}."
            )
        return value


class _CollectionCounts(TypedDict):
    """What CollectionAdmin.get_queryset annotates (selectors.collections_with_counts)."""

    document_count: int
    ready_count: int
    chunk_count: int


@admin.register(Collection)
class CollectionAdmin(admin.ModelAdmin):
    form = CollectionForm
    list_display = ["name", "slug", "text_search_config", "is_public", "documents", "ready",
                    "chunks", "index_status", "updated_at"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}

    filter_horizontal = ["allowed_users", "allowed_groups"]
    list_filter = ["is_public"]
    fieldsets = [
        (None, {"fields": ["name", "slug", "description", "text_search_config"]}),
        ("Access", {"fields": ["is_public", "allowed_users", "allowed_groups"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Collection]:
        return selectors.collections_with_counts(
            super().get_queryset(request).filter(selectors.collections_visible_to(user=request.user))
        )

    @admin.display(ordering="document_count")
    def documents(self, obj: WithAnnotations[Collection, _CollectionCounts]) -> int:
        return obj.document_count

    @admin.display(ordering="ready_count")
    def ready(self, obj: WithAnnotations[Collection, _CollectionCounts]) -> int:
        return obj.ready_count

    @admin.display(ordering="chunk_count", description="Searchable chunks")
    def chunks(self, obj: WithAnnotations[Collection, _CollectionCounts]) -> int:
        return obj.chunk_count

    @admin.display(description="Index", ordering="reindex_status")
    def index_status(self, obj: Collection) -> str:
        if obj.reindex_status == Collection.ReindexStatus.FAILED:
            return f"{obj.get_reindex_status_display()}: {obj.reindex_error[:200]}"
        return obj.get_reindex_status_display()

    def save_model(self, request: HttpRequest, obj: Collection, form: forms.ModelForm,
                   change: bool) -> None:
        super().save_model(request, obj, form, change)
        if change and "text_search_config" in form.changed_data:
            count = collections.collection_reindex_queue(collection=obj)
            self.message_user(
                request,
                f"Re-indexing {chunk_count_text(count)} with “{obj.text_search_config}” in the "
                "background; the Index column shows when it is done.")


class ChunkInline(admin.TabularInline):
    model = Chunk
    readonly_fields = ("ordinal", "preview", "token_count", "heading", "pages")
    fields = readonly_fields
    extra = 0
    can_delete = False
    show_change_link = False
    verbose_name_plural = "Chunks (current version, read-only)"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Chunk]:
        return super().get_queryset(request).filter(generation=F("document__chunk_generation"))

    def has_add_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    @admin.display(description="Text")
    def preview(self, obj: Chunk) -> SafeString:
        return format_html('<div class="kb-chunk-text">{}</div>', obj.text)

    @admin.display(description="Heading path")
    def heading(self, obj: Chunk) -> str:
        return obj.heading_path_text

    @admin.display(description="Page")
    def pages(self, obj: Chunk) -> str | int:
        if obj.page_start is None:
            return "–"
        if obj.page_end and obj.page_end != obj.page_start:
            return f"{obj.page_start}–{obj.page_end}"
        return obj.page_start


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    """A file field that takes several files (Django's documented pattern)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("widget", MultipleFileInput())
        super().__init__(*args, **kwargs)

    def clean(self, data: object, initial: object = None) -> list[UploadedFile]:
        files = data if isinstance(data, list | tuple) else [data]
        return [super(MultipleFileField, self).clean(item, initial) for item in files]


class UploadForm(forms.Form):
    collection = forms.ModelChoiceField(queryset=Collection.objects.all(), empty_label=None)
    # The form's metaclass moves declared fields into base_fields: Form.files stays the
    # uploaded files, which the stubs cannot see.
    files = MultipleFileField(  # type: ignore[assignment]
        allow_empty_file=True,
        help_text=(
            "PDF, DOCX, HTML, Markdown, text, or a zip of these. "
            "Several files at once are fine."
        ),
    )


class MoveForm(forms.Form):
    collection = forms.ModelChoiceField(queryset=Collection.objects.none(), empty_label=None,
                                        label="Move to")

    def __init__(self, *args, collections: QuerySet[Collection], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cast(forms.ModelChoiceField, self.fields["collection"]).queryset = collections


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    list_display = ["title_or_name", "collection", "status_badge", "progress", "kind", "size",
                    "created_at"]
    # Only collections that appear in the rows shown: the full list would name restricted ones.
    list_filter = ["status", ("collection", admin.RelatedOnlyFieldListFilter), "mime_type"]
    search_fields = ["title", "original_filename"]
    list_select_related = ["collection"]
    date_hierarchy = "created_at"
    # The collection is read-only here: saving a new one would leave the chunks, and with
    # them search, in the old collection. Moving is the "Move to collection…" action.
    readonly_fields = ["collection", "original_filename", "mime_type", "size", "content_hash",
                       "status_badge", "progress", "error_message", "attempts", "metadata",
                       "created_at", "updated_at", "source_link"]
    fields = ["title", "collection", "source_link", *readonly_fields[1:-1]]
    inlines = [ChunkInline]
    actions = ["reprocess", "retry_failed", "disable", "enable", "move"]
    change_list_template = "admin/kb/document/change_list.html"

    class Media:
        js = ["kb/admin_progress.js"]
        css = {"all": ["kb/admin.css"]}

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # uploads go through the upload page, which handles many files and zips

    def get_queryset(self, request: HttpRequest) -> QuerySet[Document]:
        # Editors who are not superusers see only the collections they may read.
        return super().get_queryset(request).filter(
            collection__in=selectors.collections_visible(user=request.user)
        )

    def get_urls(self) -> list[URLPattern]:
        return [
            path("upload/", self.admin_site.admin_view(self.upload_view),
                 name="kb_document_upload"),
            path("progress/", self.admin_site.admin_view(self.progress_view),
                 name="kb_document_progress"),
            *super().get_urls(),
        ]

    @admin.display(description="Title", ordering="title")
    def title_or_name(self, obj: Document) -> SafeString:
        # The poller replaces it once parsing has found the document's own title.
        return format_html('<span data-document-title="{}">{}</span>', obj.pk,
                           obj.title or obj.original_filename)

    @admin.display(description="Type", ordering="mime_type")
    def kind(self, obj: Document) -> SafeString:
        # Office MIME types are longer than the rest of the row; the full one is the tooltip.
        return format_html('<span title="{}">{}</span>', obj.mime_type,
                           DOCUMENT_KINDS.get(obj.mime_type, obj.mime_type))

    @admin.display(description="Status", ordering="status")
    def status_badge(self, obj: Document) -> SafeString:
        return format_html(
            '<span class="kb-status kb-status-{}" data-document-status="{}" title="{}">{}</span>',
            obj.status, obj.pk, obj.error_message, obj.get_status_display(),
        )

    @admin.display(description="Progress")
    def progress(self, obj: Document) -> SafeString:
        data = document_progress_payload(obj)
        return format_html(
            '<span data-document-progress="{}" data-active="{}">{}</span>',
            obj.pk, "1" if data["active"] else "0", data["text"],
        )

    @admin.display(description="Size", ordering="size_bytes")
    def size(self, obj: Document) -> str:
        return human_size(obj.size_bytes)

    @admin.display(description="Source")
    def source_link(self, obj: Document) -> str:
        if not obj.pk or obj.chunk_generation == 0:
            return "–"
        return format_html('<a href="{}">View extracted text</a>', obj.get_absolute_url())

    def progress_view(self, request: HttpRequest) -> JsonResponse:
        ids = [int(x) for x in request.GET.get("ids", "").split(",") if x.strip().isdigit()][:500]
        documents = self.get_queryset(request).filter(pk__in=ids)
        return JsonResponse({"documents": [document_progress_payload(d) for d in documents]})

    def upload_view(self, request: HttpRequest) -> HttpResponse:
        uploads.upload_permission_check(user=request.user)
        form = UploadForm(request.POST or None, request.FILES or None)
        cast(forms.ModelChoiceField, form.fields["collection"]).queryset = (
            selectors.collections_visible(user=request.user)
        )
        if request.method == "POST" and form.is_valid():
            outcomes = uploads.documents_upload_files(
                collection=form.cleaned_data["collection"], files=form.cleaned_data["files"],
                uploaded_by=request.user,
            )
            self._report_outcomes(request, uploads.upload_outcomes_refresh(outcomes=outcomes))
            return redirect("admin:kb_document_changelist")
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "form": form,
            "title": "Upload documents",
            "max_mb": settings.KB_MAX_UPLOAD_BYTES // (1024 * 1024),
        }
        return TemplateResponse(request, "admin/kb/document/upload.html", context)

    def _report_outcomes(
        self, request: HttpRequest, outcomes: list[uploads.UploadOutcome]
    ) -> None:
        summary = uploads.upload_summary(outcomes=outcomes)
        failed_url = reverse("admin:kb_document_changelist") + "?status__exact=failed"
        if summary.rejected or summary.failed:
            level = messages.WARNING
        elif summary.queued:
            level = messages.INFO  # nothing has been read yet: not a success until it is
        else:
            level = messages.SUCCESS
        if summary.rejected or summary.failed:
            link = "Show failed documents"
        elif summary.queued:
            link = "Any that fail will be listed here"
        else:
            link = None
        self.message_user(
            request,
            format_html('{} <a href="{}">{}</a>', summary.text, failed_url, link) if link
            else summary.text,
            level,
        )
        for outcome in outcomes:
            failed = (
                outcome.document is not None
                and outcome.document.status == Document.Status.FAILED
            )
            if outcome.outcome in {"duplicate", "rejected"} or failed:
                level = messages.INFO if outcome.outcome == "duplicate" else messages.ERROR
                self.message_user(request, f"{outcome.filename}: {outcome.message}", level)

    @admin.action(description="Reprocess selected documents")
    def reprocess(self, request: HttpRequest, queryset: QuerySet[Document]) -> None:
        queued = sum(documents.document_retry(document=d) for d in queryset)
        self.message_user(
            request, ngettext("%d document queued.", "%d documents queued.", queued) % queued
        )

    @admin.action(description="Retry failed documents")
    def retry_failed(self, request: HttpRequest, queryset: QuerySet[Document]) -> None:
        queued = sum(
            documents.document_retry(document=d)
            for d in queryset.filter(status=Document.Status.FAILED)
        )
        self.message_user(
            request, ngettext("%d document queued.", "%d documents queued.", queued) % queued
        )

    @admin.action(description="Disable (remove from search, keep)")
    def disable(self, request: HttpRequest, queryset: QuerySet[Document]) -> None:
        count = 0
        for document in queryset:
            documents.document_disable(document=document)
            count += 1
        self.message_user(
            request, ngettext("Disabled %d document.", "Disabled %d documents.", count) % count
        )

    @admin.action(description="Enable (put back into search)")
    def enable(self, request: HttpRequest, queryset: QuerySet[Document]) -> None:
        count = 0
        for document in queryset.filter(status=Document.Status.DISABLED):
            documents.document_enable(document=document)
            count += 1
        self.message_user(request, ngettext("Enabled %d document.", "Enabled %d documents.", count)
                          % count)

    @admin.action(description="Move to collection…", permissions=["change"])
    def move(
        self, request: HttpRequest, queryset: QuerySet[Document]
    ) -> TemplateResponse | None:
        form = MoveForm(request.POST if "apply" in request.POST else None,
                        collections=selectors.collections_visible(user=request.user))
        if form.is_valid():
            target = form.cleaned_data["collection"]
            moved = 0
            for document in queryset:
                try:
                    documents.document_move(document=document, collection=target,
                                            actor=request.user)
                except (PermissionDenied, documents.DocumentMoveRefused) as exc:
                    self.message_user(request, f"{document}: {exc}", messages.ERROR)
                    continue
                moved += 1
            self.message_user(request, ngettext(
                "Moved %(count)d document to “%(target)s”.",
                "Moved %(count)d documents to “%(target)s”.", moved,
            ) % {"count": moved, "target": target})
            return None
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "form": form,
            "documents": queryset,
            "title": "Move documents to another collection",
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/kb/document/move.html", context)

    def delete_model(self, request: HttpRequest, obj: Document) -> None:
        documents.document_delete(document=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Document]) -> None:
        for document in queryset:
            documents.document_delete(document=document)


class SelectWithUnavailable(forms.Select):
    """A select whose options listed in `unavailable` are shown but cannot be chosen."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.unavailable: set[str] = set()

    def create_option(
        self, name: str, value: object, label: int | str, selected: bool,
        index: int, subindex: int | None = None, attrs: dict[str, object] | None = None,
    ) -> dict[str, object]:
        option = super().create_option(name, value, label, selected, index, subindex, attrs)
        if value in self.unavailable:
            option["attrs"]["disabled"] = True
        return option


class ReembedForm(forms.Form):
    key = forms.ChoiceField(label="Embedding model", widget=SelectWithUnavailable)
    activate = forms.BooleanField(
        required=False, initial=True,
        help_text="Switch search to the new model as soon as every chunk has a vector in it.",
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        active = selectors.embedding_model_active()
        keys = [key for key in registry.embedding_model_keys()
                if active is None or key != active.key]
        # A model that cannot work (no API key, say) is listed with the reason, not offered.
        self.unavailable = {key: reason for key in keys
                            if (reason := registry.embedding_unavailable_reason(key))}
        choices = []
        for key in keys:
            label = f"{key} — {registry.embedding_entry(key).get('MODEL', '')}"
            if key in self.unavailable:
                label += f" (unavailable: {self.unavailable[key]})"
            choices.append((key, label))
        field = cast(forms.ChoiceField, self.fields["key"])
        field.choices = choices
        cast(SelectWithUnavailable, field.widget).unavailable = set(self.unavailable)
        self.available = [key for key in keys if key not in self.unavailable]
        if self.available:
            field.initial = self.available[0]

    def clean_key(self) -> str:
        key = self.cleaned_data["key"]
        if key in self.unavailable:
            raise forms.ValidationError(f"{key} cannot be used: {self.unavailable[key]}.")
        return key


class ActivateOverrideForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}), max_length=2000,
        help_text="Why search should switch to this model although it measured worse; kept "
                  "with the verdict and logged.")


@admin.register(EmbeddingModel)
class EmbeddingModelAdmin(admin.ModelAdmin):
    list_display = ["key", "model_name", "dimensions", "status", "is_active", "progress",
                    "gate", "created_at", "activated_at"]
    readonly_fields = ["key", "backend", "model_name", "dimensions", "status", "is_active",
                       "chunks_total", "chunks_embedded", "error_message", "gate_verdict",
                       "created_at", "activated_at"]
    actions = ["activate", "cancel", "drop_vectors"]
    change_list_template = "admin/kb/embeddingmodel/change_list.html"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False  # vectors are dropped with the action, which refuses the active model

    def get_urls(self) -> list[URLPattern]:
        return [
            path("reembed/", self.admin_site.admin_view(self.reembed_view),
                 name="kb_embeddingmodel_reembed"),
            path("<int:pk>/activate-override/",
                 self.admin_site.admin_view(self.activate_override_view),
                 name="kb_embeddingmodel_activate_override"),
            *super().get_urls(),
        ]

    @admin.display(description="Quality gate")
    def gate(self, obj: EmbeddingModel) -> str:
        run = quality_gate_latest(model=obj)
        return run.outcome if run else "–"

    @admin.display(description="Quality gate verdict")
    def gate_verdict(self, obj: EmbeddingModel) -> str:
        run = quality_gate_latest(model=obj)
        if run is None:
            return "Not run (the gate runs when the model is activated)."
        if run.override_reason:
            return f"{run.summary} Overridden: {run.override_reason}"
        return run.summary

    def activate_override_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        """Activate a model the quality gate refused, with the editor's reason."""
        if not self.has_change_permission(request):
            raise PermissionDenied("Activating needs the “Can change embedding model” permission.")
        model = get_object_or_404(EmbeddingModel, pk=pk)
        form = ActivateOverrideForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                embeddings.embedding_model_activate(
                    model=model, override_reason=form.cleaned_data["reason"])
            except embeddings.EmbeddingModelError as exc:
                self.message_user(request, str(exc), messages.ERROR)
            else:
                self.message_user(request, f"Search now uses {model.key} (quality gate "
                                           "overridden).", messages.WARNING)
            return redirect("admin:kb_embeddingmodel_changelist")
        run = quality_gate_latest(model=model)
        context = {**self.admin_site.each_context(request), "opts": self.model._meta,
                   "form": form, "model": model, "run": run,
                   "title": f"Activate {model.key} despite the quality gate"}
        return TemplateResponse(request, "admin/kb/embeddingmodel/activate_override.html",
                                context)

    @admin.display(description="Progress")
    def progress(self, obj: EmbeddingModel) -> str:
        if not obj.chunks_total:
            return "–"
        percent = 100 * obj.chunks_embedded // obj.chunks_total
        return f"{obj.chunks_embedded}/{obj.chunks_total} ({percent}%)"

    def reembed_view(self, request: HttpRequest) -> HttpResponse:
        # Re-embedding the whole knowledge base is a change to the embedding models.
        if not self.has_change_permission(request):
            raise PermissionDenied(
                "Re-embedding needs the “Can change embedding model” permission."
            )
        form = ReembedForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                model = embedding_models.reembed_queue(key=form.cleaned_data["key"],
                                                       activate=form.cleaned_data["activate"])
            except embeddings.EmbeddingModelError as exc:
                self.message_user(request, str(exc), messages.ERROR)
            else:
                self.message_user(
                    request,
                    f"Re-embedding with {model.key} started in the background; search keeps "
                    "using the active model until it is complete.",
                )
            return redirect("admin:kb_embeddingmodel_changelist")
        verdicts = QualityGateRun.objects.select_related("candidate")[:5]
        context = {**self.admin_site.each_context(request), "opts": self.model._meta,
                   "form": form, "title": "Re-embed the knowledge base", "verdicts": verdicts}
        return TemplateResponse(request, "admin/kb/embeddingmodel/reembed.html", context)

    @admin.action(description="Activate (switch search to this model)")
    def activate(self, request: HttpRequest, queryset: QuerySet[EmbeddingModel]) -> None:
        for model in queryset:
            try:
                embeddings.embedding_model_activate(model=model)
                run = quality_gate_latest(model=model)
                self.message_user(request, f"Search now uses {model.key}. "
                                           f"{run.summary if run else ''}")
            except embeddings.QualityGateRefused as exc:
                url = reverse("admin:kb_embeddingmodel_activate_override", args=[model.pk])
                self.message_user(request, format_html(
                    "{} <a href=\"{}\">Activate anyway, with a reason…</a>", str(exc), url),
                    messages.ERROR)
            except embeddings.EmbeddingModelError as exc:
                self.message_user(request, str(exc), messages.ERROR)

    @admin.action(description="Cancel re-embedding")
    def cancel(self, request: HttpRequest, queryset: QuerySet[EmbeddingModel]) -> None:
        for model in queryset:
            embeddings.reembed_cancel(model=model)
        self.message_user(request, "Cancelled; the job stops after its current page.")

    @admin.action(description="Drop vectors (inactive models only)")
    def drop_vectors(self, request: HttpRequest, queryset: QuerySet[EmbeddingModel]) -> None:
        for model in queryset:
            try:
                embedding_models.embedding_model_drop_vectors_queue(model=model)
            except embeddings.EmbeddingModelError as exc:
                self.message_user(request, str(exc), messages.ERROR)
            else:
                self.message_user(
                    request, f"Dropping the vectors of {model.key} in the background; its "
                             "status shows Retired when they are gone.")


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = ["created_at", "kind", "provider", "model", "input_tokens", "output_tokens",
                    "cost_usd", "latency_ms", "time_to_first_token_ms", "cache_hit", "status"]
    list_filter = ["kind", "provider", "model", "cache_hit", "status"]
    date_hierarchy = "created_at"
    list_select_related = ["user", "api_key"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[UsageRecord]:
        # A record names its document: only those the editor may read, as in the document admin.
        return super().get_queryset(request).filter(
            Q(document__isnull=True)
            | Q(document__in=selectors.documents_visible(user=request.user, include_disabled=True))
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False


class ApiKeyForm(forms.ModelForm):
    # Set by ApiKeyAdmin.get_form: the signed-in user who grants the key.
    granter: AnyUser

    class Meta:
        model = ApiKey
        fields = ["name", "user", "collections", "rate_limit"]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if "user" in self.fields:
            owners = cast(forms.ModelChoiceField, self.fields["user"])
            owners.queryset = key_access.api_key_owners_assignable(user=self.granter)
            owners.initial = self.granter.pk
        grantable = cast(forms.ModelMultipleChoiceField, self.fields["collections"])
        grantable.queryset = key_access.api_key_collections_grantable(granter=self.granter)

    def clean_rate_limit(self) -> str:
        value = self.cleaned_data["rate_limit"].strip()
        if value:
            try:
                rate_limit_parse(value)
            except ValueError:
                raise forms.ValidationError(
                    "Use the form N/s, N/m, N/h or N/d, e.g. 600/m."
                ) from None
        return value

    def clean(self) -> dict[str, object]:
        super().clean()
        cleaned = self.cleaned_data
        owner = cleaned.get("user") if "user" in self.fields else self.instance.user
        collections = cleaned.get("collections")
        if owner is None or collections is None:
            return cleaned
        # A rename or a new rate limit grants nothing; new collections and new keys do.
        if self.instance.pk and "collections" not in self.changed_data:
            return cleaned
        try:
            key_access.api_key_grant_check(
                granter=self.granter, owner=owner, collections=collections
            )
        except key_access.ApiKeyGrantError as exc:
            self.add_error(exc.field if exc.field in self.fields else None, str(exc))
        return cleaned


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
    list_display = [
        "name", "prefix", "user", "rate_limit", "created_at", "last_used_at", "revoked_at"
    ]
    filter_horizontal = ["collections"]
    list_filter = ["revoked_at"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiKey]:
        # Without kb.manage_all_api_keys a staff user sees, edits and revokes only their keys.
        return super().get_queryset(request).filter(
            pk__in=key_access.api_keys_manageable(user=request.user).values("pk")
        )

    def get_readonly_fields(
        self, request: HttpRequest, obj: ApiKey | None = None
    ) -> list[str] | tuple[str, ...]:
        # Moving a key to another user would hand them its access; make a new key instead.
        return [*self.readonly_fields, "user"] if obj is not None else self.readonly_fields

    def get_form(
        self, request: HttpRequest, obj: ApiKey | None = None, change: bool = False, **kwargs
    ) -> type[forms.ModelForm]:
        form = super().get_form(request, obj, change=change, **kwargs)
        return type(form.__name__, (form,), {"granter": request.user})

    def save_model(self, request: HttpRequest, obj: ApiKey, form: forms.ModelForm,
                   change: bool) -> None:
        if not change:
            # The form saves the chosen collections itself (save_related), after this.
            _, raw_key = api_keys.api_key_create(
                user=obj.user, name=obj.name, rate_limit=obj.rate_limit, api_key=obj)
            self.message_user(
                request,
                f"API key created. Copy it now, it is not shown again: {raw_key}",
                messages.WARNING,
            )
            return
        super().save_model(request, obj, form, change)

    @admin.action(description="Revoke selected keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        count = key_access.api_keys_revoke(actor=request.user, keys=queryset)
        self.message_user(request, f"Revoked {count} keys.")


admin.site.site_header = "Knowledge base"
admin.site.site_title = "Knowledge base admin"
admin.site.index_title = "Content and operations"
