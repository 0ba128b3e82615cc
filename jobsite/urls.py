from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import RedirectView

from extraction.api import router as extraction_router
from jobsite import views
from jobsite.api import api
from jobsite.metrics import metrics_view
from training_runs.api import router as training_router

# The apps' routers are mounted here, not in jobsite.api: the apps import jobsite.api for what
# their endpoints share, so jobsite.api importing them back would work only by load order.
api.add_router("/", extraction_router)
api.add_router("/", training_router)

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", api.urls),
    path("api/docs", RedirectView.as_view(url="/api/v1/docs", permanent=False)),
    path("metrics", metrics_view, name="metrics"),
    path("", views.home, name="home"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("extractions/", include("extraction.urls")),
    path("training/", include("training_runs.urls")),
]
