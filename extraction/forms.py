"""Page forms. They only shape the input; the services decide what is valid for a model."""

from __future__ import annotations

import re

from django import forms

from extraction import selectors, services
from extraction.constants import BLOCK_ORDER, TRANSFORMERLENS_NAMES, VALID_BATCH_SIZES
from extraction.models import Extraction
from jobsite.forms import require_one_of

BATCH_SIZE_CHOICES = [(size, str(size)) for size in VALID_BATCH_SIZES]


def parse_layers(text: str) -> list[int]:
    """'0,2', '0 2' or '0-3' (a range includes both ends)."""
    layers: list[int] = []
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        # ASCII digits only: "٣" is not a layer anyone means to type.
        match = re.fullmatch(r"([0-9]{1,30})(?:-([0-9]{1,30}))?", part)
        if not match:
            raise forms.ValidationError("Write layers as numbers separated by commas, e.g. 0,2 or 0-3.")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise forms.ValidationError(f"The range {part} runs backwards; write it as {last}-{first}.")
        if last - first >= 10_000:
            raise forms.ValidationError(f"The range {part} is longer than any model's layers.")
        layers.extend(range(first, last + 1))
    return sorted(set(layers))


def parse_shards(text: str) -> int | str:
    """A whole number or auto, as typed; a number left for the service to check against the samples."""
    text = (text or "").strip().lower()
    if text == services.AUTO_SHARDS:
        return services.AUTO_SHARDS
    if re.fullmatch(r"[0-9]{1,9}", text):
        return int(text)
    return text  # the service refuses it with the sentence every entry point says


class ExtractionStartForm(forms.Form):
    model = forms.ModelChoiceField(queryset=None, empty_label=None)
    dataset = forms.ModelChoiceField(queryset=None, empty_label=None)
    layers = forms.CharField(max_length=200, initial="0", required=False, help_text="e.g. 0,2 or 0-3")
    hooks = forms.MultipleChoiceField(
        choices=[(hook, f"{hook} ({TRANSFORMERLENS_NAMES[hook]})") for hook in BLOCK_ORDER], initial=["residual"],
        widget=forms.CheckboxSelectMultiple, required=False,
    )
    hook_names = forms.CharField(
        max_length=1000, required=False, label="or by name",
        help_text="TransformerLens's names, comma separated: hook_mlp_out, or blocks.5.hook_mlp_out for layer 5 alone",
    )
    batch_size = forms.TypedChoiceField(choices=BATCH_SIZE_CHOICES, coerce=int, initial=8)
    max_samples = forms.IntegerField(required=False, min_value=1, help_text="empty: all samples")
    # Not prefilled: a 512 there would be refused for a model that reads fewer tokens.
    max_length = forms.IntegerField(required=False, min_value=1)
    storage_dtype = forms.ChoiceField(
        choices=[(value, value) for value in Extraction.StorageDtype.values], initial="float32", label="Storage dtype",
    )
    auto_retry_on_oom = forms.BooleanField(required=False, label="Auto-retry on out of memory (halve the batch)")
    shards = forms.CharField(max_length=20, initial="1", required=False,
                             help_text="Workers that run it at once (auto: one per live worker)")

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("label_suffix", "")
        super().__init__(*args, **kwargs)
        self.fields["model"].queryset = selectors.model_list()
        self.fields["dataset"].queryset = selectors.dataset_list()
        default = services.DEFAULT_MAX_LENGTH
        smaller = [f"{model.name}: {model.max_positions:,}" for model in self.fields["model"].queryset
                   if model.max_positions and model.max_positions < default]
        self.fields["max_length"].widget.attrs["placeholder"] = str(default)
        self.fields["max_length"].help_text = (
            f"tokens; empty: {default}, or the model's position limit when smaller"
            + (f" ({'; '.join(smaller)})" if smaller else "")
        )

    def clean_layers(self):
        return parse_layers(self.cleaned_data["layers"])

    def clean_shards(self):
        return parse_shards(self.cleaned_data["shards"]) if self.cleaned_data["shards"].strip() else 1

    def clean(self):
        data = super().clean()
        names = [name for name in re.split(r"[,\s]+", data.get("hook_names") or "") if name]
        # Each field on its own, whatever another one's error: every error is shown at once.
        if "hooks" in data and "hook_names" in data:
            data["hooks"] = [*data["hooks"], *names]
            if not data["hooks"]:
                self.add_error("hooks", "Choose at least one hook point.")
        if "layers" in data and not data["layers"] and not any(name.startswith("blocks.") for name in names):
            self.add_error("layers", "Choose at least one layer, e.g. 0 or 0,2.")
        return data

    def service_values(self) -> dict | None:
        """What the service checks of this form's input, each field that did not clean as None
        (see services.parameter_problems); None when the model itself is not known."""
        data = self.cleaned_data
        if "model" not in data:
            return None
        return {
            "model": data["model"], "dataset": data.get("dataset"),
            "layers": data.get("layers") if "layers" not in self.errors else None,
            "hooks": data.get("hooks") if "hooks" not in self.errors else None,
            "batch_size": data.get("batch_size"), "max_samples": data.get("max_samples"),
            "max_length": data.get("max_length"), "storage_dtype": data.get("storage_dtype"),
            "shards": data.get("shards"),
        }


class RetryForm(forms.Form):
    """A person's retry with edited parameters; a field left out keeps the original's value. The
    editor shows the original's max samples, so emptying that field asks for all samples."""

    batch_size = forms.TypedChoiceField(
        choices=[("", "same")] + BATCH_SIZE_CHOICES, coerce=int, empty_value=None, required=False,
    )
    max_samples = forms.IntegerField(required=False, min_value=1)
    max_length = forms.IntegerField(required=False, min_value=1)
    shards = forms.CharField(max_length=20, required=False, help_text="empty: the original's")

    def clean_shards(self):
        return parse_shards(self.cleaned_data["shards"]) if self.cleaned_data["shards"].strip() else None

    def clean_max_samples(self):
        value = self.cleaned_data["max_samples"]
        if value is None and self.add_prefix("max_samples") in self.data:
            return services.ALL_SAMPLES
        return value


class RegisterForm(forms.Form):
    """A model (a save_pretrained directory) or a dataset (a .txt or .jsonl file) already on
    the server, by its path, or a dataset file uploaded; the services check the path or the
    file and read what it holds. The kind is the form's prefix (model-path, dataset-path), so
    both forms share one page."""

    path = forms.CharField(max_length=1000, required=False)
    upload = forms.FileField(required=False, label="or upload a file",
                             widget=forms.ClearableFileInput(attrs={"accept": ".txt,.jsonl"}),
                             error_messages={"empty": "The chosen file is empty; a dataset needs at least one sample."})
    name = forms.CharField(max_length=200, required=False, help_text="empty: the folder's or file's name")

    def __init__(self, *args, kind: str = "model", **kwargs):
        kwargs.setdefault("label_suffix", "")
        kwargs.setdefault("prefix", kind)
        super().__init__(*args, **kwargs)
        if kind == "model":
            del self.fields["upload"]
            self.fields["path"].required = True
            self.fields["path"].help_text = "the directory save_pretrained wrote, under a model root"
        else:
            self.fields["path"].help_text = "a .txt (one sample a line) or .jsonl file under the data directory"
            self.fields["upload"].help_text = "kept under the data directory, at most 200 MB"

    def clean(self):
        data = super().clean()
        if "upload" not in self.fields or self.errors:
            return data
        require_one_of(data, "path", "upload", both="Give a path or upload a file, not both.",
                       neither="Give the path of a file under the data directory, or upload one.")
        return data
