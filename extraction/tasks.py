from extraction.models import Extraction, ExtractionShard
from extraction.services import extraction_run, extraction_shard_run, next_queued_shard
from jobsite.worker import execute


def run_extraction(extraction_id: int) -> None:
    """django-q2 entry point: claim, heartbeat, run, record. Duplicate delivery is a no-op."""
    execute(Extraction, extraction_id, extraction_run)


def run_extraction_shard(shard_id: int) -> None:
    """django-q2 entry point of one shard of an extraction run by several workers.

    A task runs the next queued shard of its extraction when its own is taken or done: a
    cluster takes its next task from the queue while its worker is still busy, and would hold
    that shard until it is free, while another cluster idles. So each shard's task, and a few
    spare ones (extraction_enqueue_shards), go to whichever worker is free first."""
    shard = ExtractionShard.objects.filter(pk=shard_id).first()
    if shard is not None and not shard.is_claimable:
        shard = next_queued_shard(extraction_id=shard.extraction_id) or shard
    execute(ExtractionShard, shard.pk if shard else shard_id, extraction_shard_run)
