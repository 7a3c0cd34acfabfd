"""Embedding models over REST: list them, re-embed the knowledge base with another one (a
background job whose URL the 202 names), activate, cancel, drop vectors.

The same permissions as the admin's embedding-model page: reading needs “Can view
embedding model”, everything else “Can change embedding model”. These act on the whole
knowledge base, so a key narrowed to some collections may read them but not change them.
"""

from __future__ import annotations

from django.shortcuts import get_object_or_404
from django.urls import reverse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import generics, serializers, status
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from kb import embeddings
from kb.api.conventions import IDEMPOTENCY_KEY, idempotent
from kb.api.permissions import key_is_narrowed
from kb.api.ratelimits import rate_limit_enforce
from kb.models import EmbeddingModel
from kb.providers import registry
from kb.services import embedding_models
from search.quality_gate import quality_gate_latest


class EmbeddingModelSerializer(serializers.ModelSerializer):
    progress = serializers.SerializerMethodField(help_text="Percent of chunks embedded.")
    quality_gate = serializers.SerializerMethodField(
        help_text="The quality gate's last verdict on activating the model, or null.")
    url = serializers.SerializerMethodField(help_text="This model's URL: the job's state.")

    class Meta:
        model = EmbeddingModel
        fields = ["key", "model_name", "dimensions", "status", "is_active", "chunks_total",
                  "chunks_embedded", "progress", "error_message", "quality_gate", "created_at",
                  "activated_at", "url"]

    def get_progress(self, model: EmbeddingModel) -> float | None:
        if not model.chunks_total:
            return None
        return round(100 * model.chunks_embedded / model.chunks_total, 1)

    def get_quality_gate(self, model: EmbeddingModel) -> dict | None:
        run = quality_gate_latest(model=model)
        if run is None:
            return None
        return {"outcome": run.outcome, "summary": run.summary,
                "override_reason": run.override_reason, "at": run.created_at.isoformat(),
                "collections": run.verdict.get("collections", [])}

    def get_url(self, model: EmbeddingModel) -> str:
        path = reverse("api-embedding-model-detail", args=[model.key])
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request is not None else path


class ReembedSerializer(serializers.Serializer):
    key = serializers.SlugField(max_length=64,
                                help_text="A key of KB_PROVIDERS['embedding'].")
    activate = serializers.BooleanField(
        default=True, help_text="Switch search to it as soon as every chunk has a vector.")

    def validate_key(self, key: str) -> str:
        if key not in registry.embedding_model_keys():
            raise ValidationError(f"No embedding model “{key}” is configured.")
        reason = registry.embedding_unavailable_reason(key)
        if reason:
            raise ValidationError(f"{key} cannot be used: {reason}.")
        return key


def _change_check(request: Request) -> None:
    rate_limit_enforce(request, group="manage")
    if not request.user.has_perm("kb.change_embeddingmodel"):
        raise PermissionDenied(
            "This needs the “Can change embedding model” permission; ask an administrator.")
    if key_is_narrowed(request):
        raise PermissionDenied(
            "A key narrowed to some collections cannot change the whole knowledge base.")


def _view_check(request: Request) -> None:
    if not request.user.has_perm("kb.view_embeddingmodel"):
        raise PermissionDenied(
            "This needs the “Can view embedding model” permission; ask an administrator.")


def _accepted(request: Request, model: EmbeddingModel) -> Response:
    """202 with the model, whose URL (also in Location) shows the job's progress."""
    body = EmbeddingModelSerializer(model, context={"request": request}).data
    return Response(body, status=status.HTTP_202_ACCEPTED, headers={"Location": body["url"]})


class EmbeddingModelList(generics.ListAPIView):
    """The embedding models that hold or held vectors, the active one first. POST re-embeds
    every chunk with another configured model in the background, while search goes on
    with the active one (202; follow Location for progress)."""

    serializer_class = EmbeddingModelSerializer
    pagination_class = None

    def get_queryset(self):
        _view_check(self.request)
        return EmbeddingModel.objects.order_by("-is_active", "-created_at")

    @extend_schema(request=ReembedSerializer, parameters=[IDEMPOTENCY_KEY],
                   responses={202: EmbeddingModelSerializer,
                              400: OpenApiResponse(description="Unknown, unusable or active")})
    def post(self, request: Request) -> Response:
        _change_check(request)
        return idempotent(request, lambda: self._reembed(request))

    def _reembed(self, request: Request) -> Response:
        serializer = ReembedSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            model = embedding_models.reembed_queue(**serializer.validated_data)
        except embeddings.EmbeddingModelError as exc:
            raise ValidationError({"key": [str(exc)]}) from None
        return _accepted(request, model)


class EmbeddingModelDetail(generics.RetrieveAPIView):
    """One embedding model: its status, progress and error (a re-embedding's job URL)."""

    serializer_class = EmbeddingModelSerializer
    lookup_field = "key"

    def get_queryset(self):
        _view_check(self.request)
        return EmbeddingModel.objects.all()


class _EmbeddingModelAction(generics.GenericAPIView):
    serializer_class = EmbeddingModelSerializer

    def get_queryset(self):
        return EmbeddingModel.objects.all()

    def act(self, request: Request, model: EmbeddingModel) -> Response:
        raise NotImplementedError

    @extend_schema(request=None, responses={200: EmbeddingModelSerializer,
                                            202: EmbeddingModelSerializer})
    def post(self, request: Request, key: str) -> Response:
        _change_check(request)
        model = get_object_or_404(self.get_queryset(), key=key)
        try:
            return self.act(request, model)
        except embeddings.EmbeddingModelError as exc:
            raise ValidationError({"status": [str(exc)]}) from None


class ActivateSerializer(serializers.Serializer):
    override_reason = serializers.CharField(
        required=False, allow_blank=True, default="", max_length=2000,
        help_text="Activate even though the quality gate finds the model worse; kept with "
                  "the verdict and logged.")


class EmbeddingModelActivate(_EmbeddingModelAction):
    """Switch search to this model; only a complete one (status ready) can be activated,
    and only if the quality gate finds it searches as well as the active one (400 with the
    verdict otherwise) or `override_reason` says why to switch anyway."""

    @extend_schema(request=ActivateSerializer, responses={200: EmbeddingModelSerializer})
    def post(self, request: Request, key: str) -> Response:
        return super().post(request, key)

    def act(self, request: Request, model: EmbeddingModel) -> Response:
        serializer = ActivateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            model = embeddings.embedding_model_activate(
                model=model, override_reason=serializer.validated_data["override_reason"])
        except embeddings.QualityGateRefused as exc:
            raise ValidationError({"quality_gate": [str(exc)]}) from None
        return Response(EmbeddingModelSerializer(model, context={"request": request}).data)


class EmbeddingModelCancel(_EmbeddingModelAction):
    """Stop a re-embedding after its current page; the vectors written so far stay."""

    def act(self, request: Request, model: EmbeddingModel) -> Response:
        embeddings.reembed_cancel(model=model)
        model.refresh_from_db()
        return Response(EmbeddingModelSerializer(model, context={"request": request}).data)


class EmbeddingModelDropVectors(_EmbeddingModelAction):
    """Delete an inactive model's vectors and index in the background (202; its status
    shows retired when they are gone)."""

    def act(self, request: Request, model: EmbeddingModel) -> Response:
        return _accepted(request,
                         embedding_models.embedding_model_drop_vectors_queue(model=model))
