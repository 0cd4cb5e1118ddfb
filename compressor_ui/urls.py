from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from jobs import account

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(template_name="login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/", include("jobs.api_urls")),
    path("account/api-token/", account.api_token, name="api-token"),
    path("", include("jobs.urls")),
]

handler400 = "jobs.error_pages.bad_request"
handler404 = "jobs.error_pages.page_not_found"
handler500 = "jobs.error_pages.server_error"
