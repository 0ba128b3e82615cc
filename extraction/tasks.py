from extraction.models import Extraction, ExtractionShard
from extraction.services import extraction_run, extraction_shard_run
from jobsite.worker import execute


def run_extraction(extraction_id: int) -> None:
    """django-q2 entry point: claim, heartbeat, run, record. Duplicate delivery is a no-op."""
    execute(Extraction, extraction_id, extraction_run)


def run_extraction_shard(shard_id: int) -> None:
    """django-q2 entry point of one shard of an extraction run by several workers."""
    execute(ExtractionShard, shard_id, extraction_shard_run)
