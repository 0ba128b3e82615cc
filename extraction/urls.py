from django.urls import path

from extraction import views

app_name = "extraction"

urlpatterns = [
    path("", views.extraction_page, name="list"),
    path("register/", views.register, name="register"),
    path("models/<int:pk>/", views.model_page, name="model"),
    path("active/", views.attention_fragment, name="active"),
    path("history/", views.history_fragment, name="history"),
    path("<int:pk>/card/", views.card_fragment, name="card"),
    path("<int:pk>/cancel/", views.extraction_cancel, name="cancel"),
    path("<int:pk>/retry/", views.extraction_retry, name="retry"),
    path("<int:pk>/retry-suggested/", views.extraction_retry_suggested, name="retry_suggested"),
    path("<int:pk>/resume/", views.extraction_resume, name="resume"),
    path("<int:pk>/dismiss/", views.extraction_dismiss, name="dismiss"),
    path("<int:pk>/restart/", views.extraction_restart, name="restart"),
    path("<int:pk>/files/", views.extraction_files, name="files"),
    path("<int:pk>/files/<str:name>", views.extraction_file, name="file"),
]
