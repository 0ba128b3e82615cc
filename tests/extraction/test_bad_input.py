"""Bad inputs through the API (and the pages and commands where the same refusal matters): each
answer is a 422 that names the fix, never a 500."""

import json
import shutil

import pytest
from django.utils import timezone

from extraction.models import Dataset, Extraction, ModelRecord

pytestmark = pytest.mark.django_db


def post(client, url, body):
    return client.post(url, data=json.dumps(body), content_type="application/json")


@pytest.fixture
def models_root(settings):
    return settings.JOBSITE_MODEL_ROOTS[0]


def register_model(client, path):
    return post(client, "/api/v1/models", {"path": str(path)})


def test_a_directory_that_is_not_a_model(staff_client, models_root):
    (models_root / "photos").mkdir()
    (models_root / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    response = register_model(staff_client, models_root / "photos")
    assert response.status_code == 422 and "No config.json found" in response.json()["message"]


def test_a_corrupt_model_safetensors(staff_client, models_root, tiny_model_dir):
    broken = models_root / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    response = register_model(staff_client, broken)
    assert response.status_code == 422 and "model weights file is corrupt" in response.json()["message"]


def test_a_trust_remote_code_config_is_refused(staff_client, models_root, tiny_model_dir):
    remote = models_root / "remote"
    shutil.copytree(tiny_model_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    response = register_model(staff_client, remote)
    assert response.status_code == 422 and "trust_remote_code, which jobsite refuses" in response.json()["message"]


def test_pickle_weights_are_refused(staff_client, models_root, tiny_model_dir):
    pickled = models_root / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    response = register_model(staff_client, pickled)
    assert response.status_code == 422 and "pickle" in response.json()["message"]


@pytest.mark.parametrize(
    ("name", "content", "sentence"),
    [
        ("empty.txt", b"", "The dataset is empty."),
        ("blank.txt", b"\n\n   \n", "The dataset is empty."),
        ("latin1.txt", "caf\u00e9\n".encode("latin-1"), "not valid UTF-8 (line 1)"),
        ("binary.txt", bytes(range(256)) * 4, "not valid UTF-8"),
        ("notjson.jsonl", b'{"text": "ok"}\nnot json\n', "Line 2 of the dataset is not JSON."),
        ("nofield.jsonl", b'{"body": "x"}\n', "needs a \"text\" string or an \"input_ids\" list of integers"),
        ("table.csv", b"a,b\n1,2\n", "must be a .txt (one sample a line) or .jsonl file"),
    ],
)
def test_bad_datasets_are_refused_with_the_fix(staff_client, settings, name, content, sentence):
    path = settings.JOBSITE_DATA_DIR / name
    path.write_bytes(content)
    response = post(staff_client, "/api/v1/datasets", {"path": str(path)})
    assert response.status_code == 422, response.content
    assert sentence in response.json()["message"]


def test_a_dataset_outside_the_data_directory_is_refused(staff_client, tmp_path):
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("hello\n")
    response = post(staff_client, "/api/v1/datasets", {"path": str(outside)})
    assert response.status_code == 422 and "outside the allowed directories" in response.json()["message"]


def break_config(models_root, tiny_model_dir, name, change):
    """A copy of the tiny model whose files `change(directory)` spoils."""
    broken = models_root / name
    shutil.copytree(tiny_model_dir, broken)
    change(broken)
    return broken


def config_with(**fields):
    def change(directory):
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **fields}))

    return change


def write(name, text):
    return lambda directory: (directory / name).write_text(text)


@pytest.mark.parametrize(
    ("change", "sentence"),
    [
        (write("config.json", "{not json"), "config.json is not valid JSON"),
        (write("config.json", "123"), "config.json must hold a JSON object"),
        (write("config.json", "[" * 100_000), "config.json is not valid JSON"),
        (config_with(n_layer="x"), "transformers cannot read this config (Validation error for field 'n_layer'"),
        (config_with(n_layer=0), "num_hidden_layers is 0; it must be a whole number from 1 to 1024"),
        # A million blocks would keep the request building a skeleton for hours.
        (config_with(n_layer=1_000_000), "num_hidden_layers is 1000000"),
        (config_with(n_head=0), "transformers cannot build a model from this config (integer division or modulo"),
        (config_with(vocab_size=0), "a vocabulary of 0 tokens"),
        (write("model.safetensors.index.json", "{}"), "is not a valid weights index"),
        (write("model.safetensors.index.json", '{"weight_map": {"w": "../../elsewhere.safetensors"}}'),
         "is not a valid weights index"),
    ],
)
def test_a_broken_config_or_index_is_a_sentence_not_a_500(staff_client, models_root, tiny_model_dir, change,
                                                            sentence):
    response = register_model(staff_client, break_config(models_root, tiny_model_dir, "broken", change))
    assert response.status_code == 422, response.content
    assert sentence in response.json()["message"]


def test_an_odd_architectures_field_falls_back_to_the_class_name(staff_client, models_root, tiny_model_dir):
    odd = break_config(models_root, tiny_model_dir, "odd", config_with(architectures=5))
    response = register_model(staff_client, odd)
    assert response.status_code == 201 and response.json()["architecture"] == "GPT2Model"


def test_a_deeply_nested_dataset_line_is_a_sentence(staff_client, settings):
    path = settings.JOBSITE_DATA_DIR / "deep.jsonl"
    path.write_text('{"text": "ok"}\n' + "[" * 100_000 + "\n")
    response = post(staff_client, "/api/v1/datasets", {"path": str(path)})
    assert response.status_code == 422
    assert "Line 2 of the dataset nests JSON too deeply to read." in response.json()["message"]


@pytest.mark.parametrize("name", ["a\u0000b", "n" * 101, "../../x", "/etc", "a//b", "a/", "-x", "name\twith tab"])
def test_names_a_person_cannot_pick_by_are_refused(staff_client, settings, models_root, tiny_model_dir, name):
    shutil.copytree(tiny_model_dir, models_root / "m1")
    response = post(staff_client, "/api/v1/models", {"path": str(models_root / "m1"), "name": name})
    assert response.status_code == 422 and response.json()["field"] == "name"
    assert "The model name " in response.json()["message"] and "cannot be used" in response.json()["message"]
    (settings.JOBSITE_DATA_DIR / "d.txt").write_text("hello\n")
    response = post(staff_client, "/api/v1/datasets", {"path": str(settings.JOBSITE_DATA_DIR / "d.txt"), "name": name})
    assert response.status_code == 422 and response.json()["field"] == "name"
    assert "The dataset name " in response.json()["message"]
    assert not ModelRecord.objects.exists() and not Dataset.objects.exists()


def test_names_as_the_hub_writes_them_and_with_spaces_are_kept(staff_client, settings, models_root, tiny_model_dir):
    shutil.copytree(tiny_model_dir, models_root / "m1")
    response = post(staff_client, "/api/v1/models", {"path": str(models_root / "m1"), "name": "EleutherAI/pythia-70m"})
    assert response.status_code == 201 and response.json()["name"] == "EleutherAI/pythia-70m"
    (settings.JOBSITE_DATA_DIR / "d.txt").write_text("hello\n")
    response = post(staff_client, "/api/v1/datasets", {"path": str(settings.JOBSITE_DATA_DIR / "d.txt"),
                                                       "name": "bike reviews v2.1"})
    assert response.status_code == 201 and response.json()["name"] == "bike reviews v2.1"


def test_a_path_registered_again_answers_200_with_its_record(staff_client, settings, models_root, tiny_model_dir):
    shutil.copytree(tiny_model_dir, models_root / "m1")
    (settings.JOBSITE_DATA_DIR / "d.txt").write_text("hello\n")
    for url, body in (("/api/v1/models", {"path": str(models_root / "m1")}),
                      ("/api/v1/datasets", {"path": str(settings.JOBSITE_DATA_DIR / "d.txt")})):
        first = post(staff_client, url, body)
        again = post(staff_client, url, {**body, "name": "another"})
        assert (first.status_code, again.status_code) == (201, 200)
        assert again.json() == first.json(), "the record the path already has, not a second one"
    assert (ModelRecord.objects.count(), Dataset.objects.count()) == (1, 1)


def test_a_record_registered_without_a_name_takes_a_usable_one_from_its_path(staff_client, settings, models_root,
                                                                            tiny_model_dir):
    shutil.copytree(tiny_model_dir, models_root / "gpt2 (copy)")
    response = post(staff_client, "/api/v1/models", {"path": str(models_root / "gpt2 (copy)")})
    assert response.status_code == 201 and response.json()["name"] == "gpt2-copy"
    (settings.JOBSITE_DATA_DIR / "..reviews...txt").write_text("hello\n")
    response = post(staff_client, "/api/v1/datasets", {"path": str(settings.JOBSITE_DATA_DIR / "..reviews...txt")})
    assert response.status_code == 201 and response.json()["name"] == "reviews"


@pytest.mark.parametrize(
    ("reason", "sentence"),
    [("x" * 501, "The retry reason is 501 characters long; the most is 500."),
     ("a\u0000b", "The retry reason contains a NUL character")],
)
def test_a_retry_reason_the_database_cannot_hold_is_refused(staff_client, fake_model, make_extraction, reason,
                                                            sentence):
    failed = make_extraction("failed", error_type="OOM")
    response = post(staff_client, f"/api/v1/models/{fake_model.pk}/extractions/{failed.pk}/retry", {"reason": reason})
    assert response.status_code == 422 and sentence in response.json()["message"]
    assert Extraction.objects.count() == 1


def test_dataset_id_is_an_id_even_when_another_dataset_is_named_like_it(staff_client, fake_model, fake_dataset,
                                                                         django_capture_on_commit_callbacks):
    from extraction.models import Dataset

    Dataset.objects.create(name=str(fake_dataset.pk), path="/data/other.txt", format="txt", num_samples=5,
                           size_bytes=10)
    with django_capture_on_commit_callbacks(execute=False):
        response = post(staff_client, f"/api/v1/models/{fake_model.pk}/extractions",
                        {"dataset_id": fake_dataset.pk, "layers": [0], "hooks": ["residual"]})
    assert response.status_code == 201
    assert Extraction.objects.get().dataset_id == fake_dataset.pk


def test_the_outside_message_is_said_once(staff_client, tmp_path):
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("hello\n")
    message = post(staff_client, "/api/v1/datasets", {"path": str(outside)}).json()["message"]
    assert message.startswith("The dataset path") and "cannot be used" not in message


BEYOND_1024 = "Max length 2,000 is beyond tiny-gpt2's position limit: it reads at most 1,024 tokens."


def test_registration_keeps_the_models_position_limit(model_record):
    assert model_record.max_positions == 1024


# However far beyond, the answer is the model's limit, not a bound of the form or the schema.
FAR_BEYOND = [2000, 1_000_001, 10**20]


def beyond(max_length: int) -> str:
    return BEYOND_1024.replace("2,000", f"{max_length:,}")


@pytest.mark.parametrize("max_length", FAR_BEYOND)
def test_a_max_length_beyond_the_position_limit_is_refused_at_start_on_its_field(staff_client, model_record, dataset,
                                                                                  max_length):
    url = f"/api/v1/models/{model_record.pk}/extractions"
    response = post(staff_client, url, {"dataset_id": dataset.pk, "layers": [0], "hooks": ["residual"],
                                        "max_length": max_length})
    assert response.status_code == 422
    assert response.json() == {"message": beyond(max_length), "field": "max_length"}
    assert Extraction.objects.count() == 0


@pytest.mark.parametrize("max_length", FAR_BEYOND)
def test_the_start_form_shows_the_position_limit_under_max_length(staff_client, model_record, dataset, max_length):
    response = staff_client.post("/extractions/", {
        "model": model_record.pk, "dataset": dataset.pk, "layers": "0", "hooks": ["residual"], "batch_size": "8",
        "max_samples": "", "max_length": str(max_length), "storage_dtype": "float32",
    })
    assert response.status_code == 400
    assert response.context["form"].errors["max_length"] == [beyond(max_length)]
    assert Extraction.objects.count() == 0


def test_a_start_counts_a_dataset_file_that_grew_since_it_was_registered(staff_client, model_record, dataset):
    registered = dataset.num_samples
    with open(dataset.path, "a", encoding="utf-8") as f:
        f.write("".join(f"appended line {i}\n" for i in range(50)))
    url = f"/api/v1/models/{model_record.pk}/extractions"
    response = post(staff_client, url, {"dataset_id": dataset.pk, "layers": [0], "hooks": ["residual"],
                                        "max_samples": registered + 50})
    assert response.status_code == 201, response.json()
    assert response.json()["total_samples"] == registered + 50
    assert Dataset.objects.get(pk=dataset.pk).num_samples == registered + 50
    response = post(staff_client, url, {"dataset_id": dataset.pk, "layers": [1], "hooks": ["residual"],
                                        "max_samples": registered + 51})
    assert response.json() == {"field": "max_samples", "message": f"Max samples must be between 1 and "
                               f"{registered + 50:,} (the samples in {dataset.name}); leave it empty (or out) for all."}


def test_a_start_on_a_dataset_whose_file_is_gone_says_so(staff_client, model_record, dataset):
    import os

    os.remove(dataset.path)
    response = post(staff_client, f"/api/v1/models/{model_record.pk}/extractions",
                    {"dataset_id": dataset.pk, "layers": [0], "hooks": ["residual"]})
    assert response.status_code == 422
    assert response.json() == {"field": "dataset",
                               "message": f"The file of dataset {dataset.name} ({dataset.path}) is gone; register it again."}
    assert Extraction.objects.count() == 0


def test_a_retry_beyond_the_position_limit_is_refused_by_the_api_and_the_page(staff_client, model_record, dataset):
    failed = Extraction.objects.create(
        model=model_record, dataset=dataset, layers=[0], hooks=["residual"], status="failed", error_type="OOM",
        finished_at=timezone.now(), fingerprint="failed-oom", total_samples=dataset.num_samples,
    )
    url = f"/api/v1/models/{model_record.pk}/extractions/{failed.pk}/retry"
    response = post(staff_client, url, {"max_length": 2000})
    assert response.status_code == 422
    assert response.json() == {"message": BEYOND_1024, "field": "max_length"}
    response = staff_client.post(f"/extractions/{failed.pk}/retry/", {"max_length": "2000"}, follow=True)
    assert [str(m) for m in response.context["messages"]] == [f"Extraction {failed.pk} was not retried: {BEYOND_1024}"]
    assert Extraction.objects.count() == 1


def test_a_model_registered_before_the_limit_was_kept_is_refused_too_and_keeps_it(staff_client, model_record,
                                                                                   dataset):
    ModelRecord.objects.filter(pk=model_record.pk).update(max_positions=None)
    url = f"/api/v1/models/{model_record.pk}/extractions"
    response = post(staff_client, url, {"dataset_id": dataset.pk, "layers": [0], "hooks": ["residual"],
                                        "max_length": 2000})
    assert response.status_code == 422
    assert response.json() == {"message": BEYOND_1024, "field": "max_length"}
    model_record.refresh_from_db()
    assert model_record.max_positions == 1024


@pytest.mark.django_db(transaction=True)
def test_a_job_queued_before_the_check_fails_in_the_worker_and_its_suggested_retry_completes(
    staff_client, model_record, dataset, settings
):
    """A job queued before starts were checked (its model registered before the limit was kept)
    is refused by the runner; the failure suggests the limit, and that retry completes."""
    from extraction.tasks import run_extraction

    settings.JOBSITE_FAILPOINTS = ""
    ModelRecord.objects.filter(pk=model_record.pk).update(max_positions=None)
    old = Extraction.objects.create(
        model=model_record, dataset=dataset, layers=[0], hooks=["residual"], max_length=2000, fingerprint="old",
        total_samples=dataset.num_samples,
    )
    run_extraction(old.pk)
    old.refresh_from_db()
    assert (old.status, old.error_type) == ("failed", "VALIDATION")
    assert old.error_message == "Max length must be between 1 and 1024 tokens; got 2000."
    assert old.suggested_retry_params == {"max_length": 1024}
    response = staff_client.post(f"/extractions/{old.pk}/retry-suggested/", follow=True)
    retry = Extraction.objects.exclude(pk=old.pk).get()
    assert [str(m) for m in response.context["messages"]] == [
        f'Extraction {retry.pk} retries extraction {old.pk} with {{"max_length": 1024}}. Extraction {retry.pk} '
        f"starts from the first sample: it asks for other samples, lengths or storage than extraction {old.pk}."
    ]
    run_extraction(retry.pk)
    retry.refresh_from_db()
    assert (retry.status, retry.max_length, retry.total_samples) == ("completed", 1024, dataset.num_samples)


@pytest.fixture
def short_model(db):
    """A model whose config reads at most 128 tokens, fewer than the default max length."""
    return ModelRecord.objects.create(
        name="tiny neox", path="/models/tiny-neox", architecture="GPTNeoXForCausalLM", model_type="gpt_neox",
        num_layers=2, hidden_size=32, vocab_size=300, supported_hooks=["residual", "mlp", "attention"],
        max_positions=128,
    )


BEYOND_128 = "Max length 512 is beyond tiny neox's position limit: it reads at most 128 tokens."


def test_a_start_with_the_default_max_length_takes_a_smaller_position_limit(staff_client, short_model, fake_dataset,
                                                                            fake_model,
                                                                            django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        short = post(staff_client, f"/api/v1/models/{short_model.pk}/extractions",
                     {"dataset_id": fake_dataset.pk, "layers": [0], "hooks": ["residual"]})
        unknown = post(staff_client, f"/api/v1/models/{fake_model.pk}/extractions",
                       {"dataset_id": fake_dataset.pk, "layers": [0], "hooks": ["residual"]})
    assert (short.status_code, short.json()["max_length"]) == (201, 128)
    assert (unknown.status_code, unknown.json()["max_length"]) == (201, 512), "no limit known: the default stands"


def test_an_explicit_max_length_beyond_a_smaller_limit_is_still_refused(staff_client, short_model, fake_dataset):
    response = post(staff_client, f"/api/v1/models/{short_model.pk}/extractions",
                    {"dataset_id": fake_dataset.pk, "layers": [0], "hooks": ["residual"], "max_length": 512})
    assert response.status_code == 422
    assert response.json() == {"message": BEYOND_128, "field": "max_length"}
    assert Extraction.objects.count() == 0


def test_the_start_form_leaves_max_length_to_the_model_and_names_smaller_limits(
    staff_client, short_model, fake_dataset, django_capture_on_commit_callbacks
):
    form = staff_client.get("/extractions/").context["form"]
    assert form["max_length"].value() is None, "a prefilled 512 would be refused for tiny neox"
    assert form.fields["max_length"].help_text == (
        "tokens; empty: 512, or the model's position limit when smaller (tiny neox: 128)"
    )
    with django_capture_on_commit_callbacks(execute=False):
        response = staff_client.post("/extractions/", {
            "model": short_model.pk, "dataset": fake_dataset.pk, "layers": "0", "hooks": ["residual"],
            "batch_size": "8", "max_samples": "", "max_length": "", "storage_dtype": "float32",
        })
    assert response.status_code == 302
    assert Extraction.objects.get().max_length == 128
    response = staff_client.post("/extractions/", {
        "model": short_model.pk, "dataset": fake_dataset.pk, "layers": "0", "hooks": ["mlp"],
        "batch_size": "8", "max_samples": "", "max_length": "512", "storage_dtype": "float32",
    })
    assert response.status_code == 400
    assert response.context["form"].errors["max_length"] == [BEYOND_128]


def test_the_extract_command_without_a_max_length_takes_a_smaller_position_limit(short_model, fake_dataset,
                                                                                 django_capture_on_commit_callbacks):
    from django.core.management import call_command

    with django_capture_on_commit_callbacks(execute=False):
        call_command("extract", short_model.name, fake_dataset.name, "--layers", "0")
    assert Extraction.objects.get().max_length == 128
