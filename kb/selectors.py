"""Reads of the core domain. Views, APIs and admin call these; they never write."""

from __future__ import annotations

from django.contrib.auth.models import AnonymousUser, User
from django.db import connection
from django.db.models import Count, Exists, F, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import Http404

from kb.models import ApiKey, Chunk, Collection, Document, EmbeddingModel


def collections_with_counts(collections: QuerySet[Collection]) -> QuerySet[Collection]:
    """The collections with document_count, ready_count and chunk_count (searchable chunks).

    The chunk count is the BM25 index's N (search.models.CollectionStatistic), which the
    triggers keep equal to the number of searchable chunks; the document counts are
    correlated subqueries on (collection, status). Joining documents to chunks and
    counting distinct rows took ~200 ms a page at 100k chunks, and counting the chunks
    of each collection scans them.
    """
    documents = Document.objects.filter(collection=OuterRef("pk")).order_by().values("collection")
    return collections.annotate(
        document_count=_count_of(documents),
        ready_count=_count_of(documents.filter(status=Document.Status.READY)),
        chunk_count=Coalesce(F("bm25_statistic__chunk_count"), 0),
    )


def _count_of(rows: QuerySet) -> Coalesce:
    return Coalesce(Subquery(rows.annotate(count=Count("pk")).values("count")), 0)


def collection_list_with_counts(*, user: Caller) -> QuerySet[Collection]:
    """The collections the caller may read with their counts (collections_with_counts), by name."""
    return collections_with_counts(collections_visible(user=user)).order_by("name")


class SystemCaller:
    """The product itself reading: management commands, evaluation, checks. Never the
    caller of a request (views pass request.user, which is AnonymousUser when nobody is
    signed in); passed by name, so "reads everything" is never reached by accident."""

    is_authenticated = False
    is_superuser = False
    pk = None

    def __repr__(self) -> str:
        return "SYSTEM"


SYSTEM = SystemCaller()

# A request's caller: request.user, a signed-in user or AnonymousUser when nobody is.
type AnyUser = User | AnonymousUser
# Whoever reads: a request's caller, or SYSTEM for the product itself.
type Caller = AnyUser | SystemCaller


def signed_in_user(caller: Caller | None) -> User | None:
    """The caller as a row of the users' table; None for AnonymousUser, SYSTEM and None."""
    return caller if isinstance(caller, User) and caller.is_authenticated else None


def collections_visible_to(*, user: Caller, api_key: ApiKey | None = None) -> Q:
    """The filter for collections a caller may read, as one SQL condition.

    Superusers read everything; other signed-in users read public collections and those
    that list them or one of their groups; anonymous users read nothing; an API key reads
    what its user may, narrowed to the key's collections when it has any. SYSTEM is the
    product itself and reads everything; None is refused, so a caller forgotten on the
    way is an error, not access to everything. Subqueries rather than joins, so the
    condition never duplicates rows.
    """
    if isinstance(user, SystemCaller):  # SYSTEM, its one instance
        condition = Q()
    elif user is None:
        raise TypeError(
            "Pass the caller (request.user), or kb.selectors.SYSTEM for the product itself."
        )
    elif isinstance(user, AnonymousUser) or not user.is_authenticated:
        condition = Q(pk__in=[])
    elif user.is_superuser:
        condition = Q()
    else:
        condition = (
            Q(is_public=True)
            | Q(pk__in=Collection.allowed_users.through.objects.filter(user_id=user.pk)
                .values("collection_id"))
            | Q(pk__in=Collection.allowed_groups.through.objects.filter(
                group_id__in=user.groups.values("pk")).values("collection_id"))
        )
    if api_key is not None:
        # A key without collections is not narrowed; asked in the same statement.
        scoped = ApiKey.collections.through.objects.filter(apikey_id=api_key.pk)
        condition &= ~Exists(scoped) | Q(pk__in=scoped.values("collection_id"))
    return condition


def collections_visible(*, user: Caller, api_key: ApiKey | None = None) -> QuerySet[Collection]:
    """Collections the caller may read."""
    return Collection.objects.filter(collections_visible_to(user=user, api_key=api_key))


def documents_visible(
    *, user: Caller, api_key: ApiKey | None = None, include_disabled: bool = False
) -> QuerySet[Document]:
    """Documents in collections the caller may read.

    Disabled documents are hidden from every reader path; only the editors' admin (and the
    usage dashboard beside it) passes include_disabled=True.
    """
    visible = collections_visible(user=user, api_key=api_key)
    documents = Document.objects.filter(collection__in=visible)
    if not include_disabled:
        documents = documents.exclude(status=Document.Status.DISABLED)
    return documents.select_related("collection")


def document_get_visible(*, pk: int, user: Caller, api_key: ApiKey | None = None) -> Document:
    """A document the caller may read, or 404 (never 403, which would confirm it exists)."""
    document = documents_visible(user=user, api_key=api_key).filter(pk=pk).first()
    if document is None:
        raise Http404("No such document.")
    return document


def chunk_list_for_document(*, document: Document) -> QuerySet[Chunk]:
    """A document's chunks in reading order."""
    return Chunk.objects.filter(document=document).order_by("ordinal")


def embedding_model_active() -> EmbeddingModel | None:
    """The embedding model that serves search, if one has been set up."""
    return EmbeddingModel.objects.filter(is_active=True).first()


def text_search_configs() -> set[str]:
    """Names of the text-search configurations the database offers (english, simple, ...)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT cfgname FROM pg_ts_config")
        return {row[0] for row in cursor.fetchall()}
