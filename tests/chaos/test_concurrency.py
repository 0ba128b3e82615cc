"""Many requests at once: the database constraints decide, not the timing."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection

from extraction.models import Extraction
from extraction.services import extraction_start

pytestmark = [pytest.mark.chaos, pytest.mark.django_db(transaction=True)]


def test_a_hundred_concurrent_identical_starts_make_exactly_one_job(fake_model, fake_dataset):
    barrier = threading.Barrier(50)  # reusable: the 100 starts go as two waves of 50 at once

    def start(_):
        barrier.wait()
        try:
            job, created = extraction_start(model=fake_model, dataset=fake_dataset, layers=[0, 1], hooks=["residual"])
            return job.pk, created
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(start, range(100)))
    assert len(results) == 100
    assert sum(created for _, created in results) == 1
    assert len({pk for pk, _ in results}) == 1
    assert Extraction.objects.count() == 1


@pytest.mark.parametrize("what", ["model", "dataset"])
def test_concurrent_registrations_of_one_path_all_get_the_one_record(what, tiny_model_dir, settings):
    from extraction import services
    from tests.conftest import TEXTS, write_dataset

    if what == "model":
        settings.JOBSITE_MODEL_ROOTS = [*settings.JOBSITE_MODEL_ROOTS, tiny_model_dir.parent]
        register, path = services.model_register, str(tiny_model_dir)
    else:
        register, path = services.dataset_register, str(write_dataset(settings, "samples.txt", TEXTS))
    barrier = threading.Barrier(6)

    def run(_):
        barrier.wait()
        try:
            return register(path=path).pk
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=6) as pool:
        ids = list(pool.map(run, range(6)))  # an IntegrityError in any of them would raise here
    assert len(set(ids)) == 1
