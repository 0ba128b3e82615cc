"""The database restarts under a running job: the worker recovers and nothing is lost."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from django.db import connection

from extraction.models import Extraction
from extraction.services import extraction_start
from tests.conftest import wait_for
from tests.extraction.test_worker_integration import reference_files

from .campaign import FAST

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def local_postgres_cluster() -> str | None:
    if connection.vendor != "postgresql" or connection.settings_dict["HOST"] not in ("127.0.0.1", "localhost"):
        return None
    if not shutil.which("pg_ctlcluster") or not Path("/etc/postgresql").is_dir():
        return None
    return sorted(os.listdir("/etc/postgresql"))[-1]


def pg_ctl(version: str, action: str) -> None:
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action, *(
        ["-m", "fast"] if action == "stop" else [])], check=True, timeout=60)


def test_postgres_restart_mid_extraction_is_survived(model_record, dataset, start_worker, tmp_path):
    version = local_postgres_cluster()
    if version is None:
        pytest.skip("needs the local PostgreSQL cluster (pg_ctlcluster) as the database, to restart it")
    job, _ = extraction_start(model=model_record, dataset=dataset, layers=[0, 2], hooks=["residual"], batch_size=2)
    worker = start_worker(**{**FAST, "JOBSITE_FAILPOINTS": json.dumps(
        {"extraction.batch": {"action": "sleep", "seconds": 0.3}})})
    wait_for(lambda: Extraction.objects.get(pk=job.pk).samples_processed >= 4, timeout=90,
             message=f"progress\n{worker.output()[-2000:]}")
    connection.close()
    pg_ctl(version, "stop")
    try:
        time.sleep(4)
    finally:
        pg_ctl(version, "start")
    wait_for(lambda: subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"]).returncode == 0, timeout=60,
             message="PostgreSQL to accept connections")
    connection.close()
    wait_for(lambda: Extraction.objects.get(pk=job.pk).status == "completed", timeout=180,
             message=f"completion after the restart\n{worker.output()[-4000:]}")
    job = Extraction.objects.get(pk=job.pk)
    assert worker.process.poll() is None, "the worker process itself survived the restart"
    produced = {p.name: p.read_bytes() for p in job.output_dir.iterdir() if p.suffix == ".npy"}
    assert produced == reference_files(job, tmp_path / "reference")
