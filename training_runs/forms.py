"""Page forms. They only shape the input; the services decide what a run allows."""

from __future__ import annotations

from django import forms
from django.conf import settings

from jobsite.forms import require_one_of
from training_runs import selectors, services
from training_runs.models import TrainingPair, TrainingRun


class GenerateForm(forms.Form):
    corpus = forms.ModelChoiceField(queryset=None, empty_label=None)
    generator = forms.ChoiceField(choices=TrainingRun.Generator.choices, initial=TrainingRun.Generator.LOCAL)
    # The same bounds as the API's.
    queries_per_chunk = forms.IntegerField(label="Queries per chunk", min_value=1, max_value=20, initial=2,
                                           required=False)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("label_suffix", "")
        super().__init__(*args, **kwargs)
        self.fields["corpus"].queryset = selectors.corpus_list()
        # Every generator is accepted (the service refuses one it cannot run, with its reason); the
        # list offers the causal LM only with a model worth its queries, and names that model.
        available, reason = services.generator_availability()
        field, Generator = self.fields["generator"], TrainingRun.Generator
        if available:
            model = settings.JOBSITE_GENERATOR_MODEL_PATH
            field.widget.choices = [(Generator.LOCAL, Generator.LOCAL.label),
                                    (Generator.CAUSAL_LM, f"{Generator.CAUSAL_LM.label}: {model}")]
        else:
            field.widget.choices = [(Generator.LOCAL, Generator.LOCAL.label)]
            field.help_text = f"The causal language model generator is not offered. {reason}"


class IdListField(forms.Field):
    """Every value of a repeated field ("pair" of each ticked checkbox) as integers."""

    widget = forms.MultipleHiddenInput

    def to_python(self, value):
        items = [str(item) for item in value or ()]
        if not all(item.isdecimal() and len(item) <= 9 for item in items):  # isdigit() takes "²", int() does not
            raise forms.ValidationError("Pair ids are numbers.")
        return [int(item) for item in items]


DECISIONS = [(TrainingPair.Review.APPROVED, "approve"), (TrainingPair.Review.REJECTED, "reject")]


class ReviewForm(forms.Form):
    """One pair ("one" = "<pair id>:<decision>", a per-pair button), the ticked pairs, or
    every pending pair (scope "all")."""

    one = forms.RegexField(regex=r"^\d{1,9}:(approved|rejected)$", required=False, label="Pair",
                           error_messages={"invalid": "Send a pair id and a decision, e.g. 12:approved."})
    decision = forms.ChoiceField(choices=DECISIONS, required=False)
    scope = forms.ChoiceField(choices=[("selected", "selected"), ("all", "all pending")], required=False)
    # Any id is accepted here; the service refuses pairs of another run by name.
    pair = IdListField(required=False, label="Pairs")

    def clean(self):
        data = super().clean()
        if data.get("one"):
            pair_id, decision = data["one"].split(":")
            return {"decision": decision, "pair_ids": [int(pair_id)]}
        if not data.get("decision"):
            raise forms.ValidationError("Choose approve or reject.")
        if data.get("scope") == "all":
            return {"decision": data["decision"], "pair_ids": None}
        if not data.get("pair"):
            raise forms.ValidationError("Tick at least one pair first, or use approve all / reject all.")
        return {"decision": data["decision"], "pair_ids": sorted(set(data["pair"]))}


class PairEditForm(forms.Form):
    query = forms.CharField(max_length=2000, strip=True, widget=forms.TextInput(attrs={"size": 80, "autofocus": True}),
                            help_text="One line, at most 200 characters; saving approves the pair.")
    pairs = forms.CharField(required=False, widget=forms.HiddenInput)  # the page of pairs to go back to


class TrainForm(forms.Form):
    epochs = forms.IntegerField(required=False, min_value=1, max_value=1000)
    patience = forms.IntegerField(required=False, min_value=1, max_value=1000)


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    """Every chosen file (Django's documented way to take several files in one field)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("widget", MultipleFileInput(attrs={"accept": ".txt,.md,.jsonl"}))
        kwargs.setdefault("error_messages", {"empty": "A chosen file is empty; choose documents with text."})
        super().__init__(*args, **kwargs)

    def clean(self, data, initial=None):
        single = super().clean
        if isinstance(data, (list, tuple)):
            return [single(item, initial) for item in data]
        return [single(data, initial)] if data else []


class CorpusForm(forms.Form):
    """A corpus from uploaded documents or from a path under the data directory; the service
    checks names, sizes and contents, as it does for the API."""

    name = forms.CharField(max_length=100, help_text="letters, digits, '.', '_' or '-'")
    files = MultipleFileField(required=False, label="Documents", help_text=".txt, .md or .jsonl (one {\"text\": …} a line)")
    path = forms.CharField(max_length=1000, required=False, label="or a path",
                           help_text="a file or folder under the data directory")
    chunk_size = forms.IntegerField(label="Chunk size", min_value=50, max_value=20000, initial=500,
                                    help_text="characters")
    chunk_overlap = forms.IntegerField(label="Overlap", min_value=0, max_value=9999, initial=50,
                                       help_text="characters")

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("label_suffix", "")
        super().__init__(*args, **kwargs)

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        require_one_of(data, "files", "path", both="Upload documents or give a path, not both.",
                       neither="Choose documents to upload, or give a path under the data directory.")
        return data
