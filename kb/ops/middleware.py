"""The shape of our own middleware: one class that runs in Django's sync and async chains."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

# What a middleware returns: the response, or (in an async chain) a coroutine of it.
MiddlewareResult = HttpResponseBase | Awaitable[HttpResponseBase]


class SyncAndAsyncMiddleware:
    """Not a MiddlewareMixin: under ASGI that runs each hook in a thread, a hop before every
    async view (chat's stream). Subclasses check `self.is_async` in __call__ and return a
    coroutine there when the chain is async."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> MiddlewareResult:
        raise NotImplementedError("A subclass answers, with a coroutine when self.is_async.")
