from django.urls import path

from training_runs import views

app_name = "training_runs"

urlpatterns = [
    path("", views.training_page, name="page"),
    path("workflow/", views.workflow_fragment, name="workflow"),
    path("history/", views.history_fragment, name="history"),
    path("corpora/", views.training_corpus_create, name="corpus_create"),
    path("corpora/list/", views.corpora_fragment, name="corpora"),
    path("generate/", views.training_generate, name="generate"),
    path("runs/<int:pk>/row/", views.row_fragment, name="row"),
    path("runs/<int:pk>/review/", views.training_review, name="review"),
    path("runs/<int:pk>/pairs/<int:pair_id>/edit/", views.training_pair_edit, name="pair_edit"),
    path("runs/<int:pk>/train/", views.training_train, name="train"),
    path("runs/<int:pk>/proceed/", views.training_proceed, name="proceed"),
    path("runs/<int:pk>/resume/", views.training_resume, name="resume"),
    path("runs/<int:pk>/stop/", views.training_stop, name="stop"),
    path("runs/<int:pk>/delete/", views.training_delete, name="delete"),
    path("runs/<int:pk>/adopt/", views.training_adopt, name="adopt"),
]
