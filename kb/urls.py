"""URL map: the admin, the API, the chat page, health probes."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from chat import quality_views
from kb import views
from kb.ops import health

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", include("kb.ops.metrics_urls")),
    # Chat users' sign-in; LOGIN_REDIRECT_URL (/chat/) unless a safe `next` is given.
    path("accounts/login/", auth_views.LoginView.as_view(redirect_authenticated_user=True),
         name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("favicon.ico", RedirectView.as_view(url=static("kb/favicon.svg"), permanent=True)),
    path("admin/usage/", include("kb.usage.urls")),
    path("admin/quality/", admin.site.admin_view(quality_views.quality_screen),
         name="quality-screen"),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/v1/", include("kb.api.urls")),
    path("api/v1/", include("search.urls")),
    path("", include("chat.urls")),
    path("documents/<int:pk>/", views.document_source, name="document-source"),
]
