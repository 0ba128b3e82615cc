"""Issue 5's hand list of bad inputs, through the API: each answer is a 422 that names the fix."""

import json
import shutil

import pytest

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
