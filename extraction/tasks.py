from extraction.models import Extraction
from extraction.services import extraction_run
from jobsite.worker import execute


def run_extraction(extraction_id: int) -> None:
    """django-q2 entry point: claim, heartbeat, run, record. Duplicate delivery is a no-op."""
    execute(Extraction, extraction_id, extraction_run)
