"""Server-rendered pages of the core app: the landing page and a document's source view."""

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from kb import selectors


def home(request: HttpRequest) -> HttpResponse:
    """The landing page: what this is, and the collections the visitor may read."""
    return render(request, "kb/home.html",
                  {"collections": selectors.collection_list_with_counts(user=request.user)})


@login_required
def document_source(request: HttpRequest, pk: int) -> HttpResponse:
    """A document's extracted text with each chunk anchored, the target of citation links."""
    document = selectors.document_get_visible(pk=pk, user=request.user)
    chunks = selectors.chunk_list_for_document(document=document)
    return render(request, "kb/document_source.html", {"document": document, "chunks": chunks})
