from django.contrib import admin
from django.urls import path
from django.views.generic import RedirectView

from jobsite.api import api
from jobsite.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", api.urls),
    path("api/docs", RedirectView.as_view(url="/api/v1/docs", permanent=False)),
    path("metrics", metrics_view, name="metrics"),
]
