from jobsite.worker import execute
from training_runs.models import TrainingRun
from training_runs.services import training_run_advance


def run_training_phase(run_id: int) -> None:
    """django-q2 entry point for both phases: the run's status says which one runs."""
    execute(TrainingRun, run_id, training_run_advance)
