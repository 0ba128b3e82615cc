from django.apps import AppConfig


class TrainingRunsConfig(AppConfig):
    name = "training_runs"
    verbose_name = "Training runs"
