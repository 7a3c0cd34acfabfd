"""The caller's API keys over REST: list, create (the key is shown once), change, revoke.

Who may do what is kb.api.key_access's, as in the admin: a user manages their own keys, and
only a holder of kb.manage_all_api_keys (a superuser holds it) sees, creates and revokes
other users' keys. A key never reads more than its granter: its collections are checked by
api_key_grant_check. When the caller is itself an API key narrowed to some collections, the
keys it creates are narrowed within those, so a narrowed key cannot mint a wider one.
"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers, status
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from kb.api import key_access
from kb.api.conventions import IDEMPOTENCY_KEY, idempotent
from kb.api.ratelimits import rate_limit_enforce, rate_limit_parse
from kb.models import ApiKey, Collection
from kb.services.api_keys import api_key_create, api_key_update


class ApiKeySerializer(serializers.ModelSerializer):
    user: serializers.SlugRelatedField[User] = serializers.SlugRelatedField(
        slug_field="username", read_only=True)
    collections: serializers.SlugRelatedField[Collection] = serializers.SlugRelatedField(
        slug_field="slug", many=True, read_only=True,
        help_text="The collections the key is narrowed to; empty: all its user may read.")
    is_active = serializers.BooleanField(read_only=True)

    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "user", "collections", "rate_limit", "is_active",
                  "created_at", "last_used_at", "revoked_at"]


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.CharField(read_only=True,
                                help_text="The key itself: shown this once, never again.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]


class ApiKeyChangeSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100, required=False)
    collections = serializers.ListField(
        child=serializers.SlugField(), required=False, max_length=200,
        help_text="Slugs of the collections the key may read (empty: all its user may).")
    rate_limit = serializers.CharField(
        max_length=32, required=False, allow_blank=True,
        help_text="This key's own limit, e.g. 600/m (empty: the server's).")

    def validate_rate_limit(self, value: str) -> str:
        value = value.strip()
        if value:
            try:
                rate_limit_parse(value)
            except ValueError:
                raise serializers.ValidationError(
                    "Use the form N/s, N/m, N/h or N/d, e.g. 600/m.") from None
        return value


class ApiKeyCreateSerializer(ApiKeyChangeSerializer):
    name = serializers.CharField(max_length=100)
    collections = serializers.ListField(
        child=serializers.SlugField(), required=False, default=list, max_length=200,
        help_text="Slugs of the collections the key may read (default: all its user may).")
    rate_limit = serializers.CharField(
        max_length=32, required=False, default="", allow_blank=True,
        help_text="This key's own limit, e.g. 600/m (default: the server's).")
    user = serializers.CharField(
        max_length=150, required=False,
        help_text="Whose key (a username; default: yours). Another user's key needs the "
                  "“Can manage every user's API keys” permission.")


class ApiKeyListCreate(generics.ListAPIView):
    """The API keys you may manage (your own; everyone's with the permission), newest first;
    POST creates one and returns it with the key, which is never shown again."""

    serializer_class = ApiKeySerializer

    def get_queryset(self):
        return (key_access.api_keys_manageable(user=self.request.user)
                .select_related("user").prefetch_related("collections")
                .order_by("-created_at", "-pk"))

    @extend_schema(request=ApiKeyCreateSerializer, responses={201: ApiKeyCreatedSerializer},
                   parameters=[IDEMPOTENCY_KEY])
    def post(self, request: Request) -> Response:
        rate_limit_enforce(request, group="manage")
        # A retry gets the same key back (shown twice, to the same caller) instead of a
        # second live key it never saw.
        return idempotent(request, lambda: self._create(request))

    def _create(self, request: Request) -> Response:
        serializer = ApiKeyCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        owner = _owner(request, data.get("user"))
        collections = _collections(request, data["collections"])
        try:
            key_access.api_key_grant_check(granter=request.user, owner=owner,
                                           collections=collections)
        except key_access.ApiKeyGrantError as exc:
            raise ValidationError({exc.field: [str(exc)]}) from None
        api_key, raw_key = api_key_create(user=owner, name=data["name"], collections=collections,
                                          rate_limit=data["rate_limit"])
        return Response({**ApiKeySerializer(api_key).data, "key": raw_key},
                        status=status.HTTP_201_CREATED)


class ApiKeyDetail(generics.RetrieveAPIView):
    """One key you may manage. PATCH renames it, changes its rate limit or the collections
    it is narrowed to (never past what you may grant, as on creation). DELETE revokes it
    (it stops working at once; the record stays, for the audit of its usage); revoking a
    revoked key is a no-op."""

    serializer_class = ApiKeySerializer

    def get_queryset(self):
        return (key_access.api_keys_manageable(user=self.request.user)
                .select_related("user").prefetch_related("collections"))

    @extend_schema(request=ApiKeyChangeSerializer, responses={200: ApiKeySerializer})
    def patch(self, request: Request, pk: int) -> Response:
        rate_limit_enforce(request, group="manage")
        api_key = get_object_or_404(self.get_queryset(), pk=pk)
        serializer = ApiKeyChangeSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        collections = None
        if "collections" in data:
            collections = _collections(request, data["collections"])
            try:
                # Narrowing to new collections grants them: checked as a new key would be.
                key_access.api_key_grant_check(granter=request.user, owner=api_key.user,
                                               collections=collections)
            except key_access.ApiKeyGrantError as exc:
                raise ValidationError({exc.field: [str(exc)]}) from None
        api_key = api_key_update(api_key=api_key, name=data.get("name"),
                                 rate_limit=data.get("rate_limit"), collections=collections)
        return Response(ApiKeySerializer(api_key).data)

    @extend_schema(request=None, responses={204: None})
    def delete(self, request: Request, pk: int) -> Response:
        api_key = get_object_or_404(self.get_queryset(), pk=pk)
        key_access.api_keys_revoke(actor=request.user, keys=ApiKey.objects.filter(pk=api_key.pk))
        return Response(status=status.HTTP_204_NO_CONTENT)


def _owner(request: Request, username: str | None):
    if not username:
        return request.user
    owner = get_user_model().objects.filter(username=username, is_active=True).first()
    if owner is None or not key_access.api_key_owners_assignable(user=request.user).filter(
        pk=owner.pk
    ).exists():
        # The same answer for a user who does not exist and one the caller may not manage.
        raise ValidationError({"user": [
            "You may create keys only for yourself; managing other users' keys needs the "
            "“Can manage every user's API keys” permission."]})
    return owner


def _collections(request: Request, slugs: list[str]) -> list[Collection]:
    found = {c.slug: c for c in Collection.objects.filter(slug__in=slugs)}
    visible = set(key_access.api_key_collections_grantable(granter=request.user)
                  .filter(slug__in=slugs).values_list("slug", flat=True))
    unknown = sorted(slug for slug in set(slugs) if slug not in visible)
    if unknown:
        # An unreadable collection is reported as unknown: its name is not the caller's to learn.
        raise ValidationError(
            {"collections": [f"No collection you can read: {', '.join(unknown)}."]})
    collections = [found[slug] for slug in dict.fromkeys(slugs)]
    calling_key = request.auth if isinstance(request.auth, ApiKey) else None
    if calling_key is not None:
        narrowed_to = set(calling_key.collections.values_list("pk", flat=True))
        if narrowed_to and (not collections
                            or any(c.pk not in narrowed_to for c in collections)):
            raise ValidationError({"collections": [
                "This API key is narrowed to some collections: a key it creates must be "
                "narrowed to some of those too."]})
    return collections
