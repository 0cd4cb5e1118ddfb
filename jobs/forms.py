"""The new-job form: plain fields mapped onto `jobs.submission`, which validates everything
(the same path as the REST API) and names the field that is wrong."""
from __future__ import annotations

from django import forms
from django.conf import settings

from .models import CalibrationUpload
from .submission import (JobRequest, SubmissionError, default_calibration_source, eval_task_options,
                         validate_submission)
from .uploads import store_request_upload

GROUP_SIZE_CHOICES = [("", "preset default"), ("32", "32"), ("64", "64"), ("128", "128"),
                      ("channel", "per output channel")]
# submission field path -> form field
FIELD_MAP = {
    "model": "model", "name": "name", "recipe.yaml": "recipe_yaml", "recipe.group_size": "group_size",
    "recipe.preset": "preset", "recipe": "preset", "calibration.samples": "calibration_samples",
    "calibration.source": "calibration_source", "calibration_file": "calibration_file",
    "calibration.seqlen": "calibration_seqlen", "evaluation.windows": "eval_windows",
    "evaluation.tasks": "eval_tasks", "evaluation.limit": "eval_limit",
}


def preset_choices() -> list[tuple[str, str]]:
    from compression.recipe import PRESETS

    return [(name, f"{name} — {description}") for name, description in PRESETS.items()]


def form_field_for(path: str, yaml_given: bool) -> str | None:
    if path.startswith("recipe.yaml") or (yaml_given and path.startswith("recipe")):
        return "recipe_yaml"
    for prefix in sorted(FIELD_MAP, key=len, reverse=True):
        if path == prefix or path.startswith(prefix + ".") or (prefix == "recipe.group_size" and "group_size" in path):
            return FIELD_MAP[prefix]
    return None


class JobForm(forms.Form):
    name = forms.CharField(max_length=200, required=False, help_text="Optional label for this job.")
    model = forms.CharField(
        max_length=500, initial="demo",
        help_text="'demo' (SmolLM2-135M-Instruct, built in), a Hugging Face id such as "
                  "meta-llama/Llama-3.1-8B-Instruct, or a local directory inside the allowed roots.")
    trust_remote_code = forms.BooleanField(
        required=False, help_text="Run custom model code from the model's repository. Only for models you trust.")
    preset = forms.ChoiceField(choices=(), initial="FP8_DYNAMIC")
    group_size = forms.ChoiceField(choices=GROUP_SIZE_CHOICES, required=False,
                                   help_text="INT4 group size (W4A16 presets only).")
    recipe_yaml = forms.CharField(
        required=False, label="Recipe YAML", widget=forms.Textarea(attrs={"rows": 8, "spellcheck": "false"}),
        help_text="Optional llm-compressor-style recipe; when given it replaces the preset.")
    calibration_source = forms.CharField(
        max_length=300, required=False, label="Calibration data",
        widget=forms.TextInput(attrs={"list": "calibration-sources", "spellcheck": "false"}),
        help_text="A file of the data directory, one of your uploads (upload:<id>), or a Hugging Face dataset "
                  "id such as HuggingFaceH4/ultrachat_200k:train_sft. Empty: the built-in default.")
    calibration_file = forms.FileField(
        required=False, label="…or upload a calibration file",
        widget=forms.ClearableFileInput(attrs={"accept": ".jsonl,.json,.txt"}),
        help_text="JSON lines (text, instruction/output or chat messages per line), a JSON list, or plain text; "
                  "UTF-8. It is kept with your uploads and used for this job.")
    calibration_samples = forms.IntegerField(min_value=1, max_value=4096, initial=128)
    calibration_seqlen = forms.IntegerField(min_value=16, max_value=8192, initial=512)
    eval_tasks = forms.MultipleChoiceField(
        choices=(), required=False, widget=forms.CheckboxSelectMultiple,
        label="Evaluation tasks",
        help_text="wikitext2_ppl is our quick WikiText-2 perplexity; the others run through lm-eval "
                  "(offline copies of the benchmarks when the data directory has them, else from the Hub). "
                  "Only tasks this installation's worker can run are listed; none ticked: no accuracy evaluation.")
    eval_limit = forms.IntegerField(min_value=1, max_value=100000, required=False, initial=50,
                                    label="lm-eval limit", help_text="Documents per lm-eval task (empty: all).")
    eval_windows = forms.IntegerField(
        min_value=1, max_value=1000, label="Perplexity windows",
        help_text="WikiText-2 test windows of 512 tokens scored for perplexity (baseline and compressed).")

    eval_speed = forms.BooleanField(
        required=False, initial=True, label="Measure speed and memory",
        help_text="Prefill and decode tokens/s and memory of the dense and the compressed model on the worker.")

    def __init__(self, *args, user=None, request=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user
        self.http_request = request
        self.fields["preset"].choices = preset_choices()
        self.task_options = eval_task_options()
        available = [o for o in self.task_options if o.available]
        self.fields["eval_tasks"].choices = [(o.name, o.label) for o in available]
        self.fields["eval_tasks"].initial = [o.name for o in available if o.name == "wikitext2_ppl"]
        self.fields["calibration_source"].help_text = (
            "A file of the data directory, builtin:chat-v1 (built in), one of your uploads (upload:<id>), or a "
            "Hugging Face dataset id such as HuggingFaceH4/ultrachat_200k:train_sft. "
            f"Empty: {default_calibration_source()}.")
        self.fields["eval_windows"].initial = settings.COMPRESSOR_EVAL_WINDOWS
        self.request: JobRequest | None = None

    def clean(self) -> dict:
        data = super().clean()
        if self.errors:
            return data
        yaml_text = (data.get("recipe_yaml") or "").strip()
        options = {}
        if data.get("group_size") and not yaml_text:
            from compression.recipe import presets_with_option

            if data["preset"] not in presets_with_option("group_size"):
                self.add_error("group_size", "a group size applies only to the W4A16 presets ("
                               + ", ".join(presets_with_option("group_size")) + ")")
                return data
            options["group_size"] = None if data["group_size"] == "channel" else int(data["group_size"])
        source = (data.get("calibration_source") or "").strip() or None
        try:
            if upload := self._store_upload():
                source = upload.source
            self.request = validate_submission(
                self.user, model=data["model"], preset=data["preset"], preset_options=options,
                recipe_yaml=yaml_text or None, trust_remote_code=bool(data.get("trust_remote_code")),
                name=data.get("name", ""),
                calibration={"source": source, "samples": data["calibration_samples"],
                             "seqlen": data["calibration_seqlen"]},
                evaluation={"tasks": data.get("eval_tasks") or [], "windows": data["eval_windows"],
                            "limit": data.get("eval_limit"), "speed": bool(data.get("eval_speed"))})
        except SubmissionError as exc:
            target = form_field_for(exc.field, bool(yaml_text))
            plain = exc.field in FIELD_MAP or exc.field == "non_field"
            self.add_error(target, exc.message if plain else f"{exc.field}: {exc.message}")
        return data

    def _store_upload(self):
        """Keep an uploaded calibration file (it becomes one of the user's uploads whatever happens to
        the rest of the form) and point the source field at it, so a re-rendered form needs no re-upload."""
        upload = store_request_upload(self.http_request, self.user, "calibration_file", required=False)
        if upload is None:
            return None
        self.data = self.data.copy()
        self.data["calibration_source"] = upload.source
        return upload

    def unavailable_tasks(self) -> list:
        """The tasks this installation cannot run, each with the reason (shown under the checkboxes)."""
        return [o for o in self.task_options if not o.available]

    def calibration_sources(self) -> list[tuple[str, str]]:
        """(value, label) suggestions: data-directory calibration files, the built-in set, the Hub
        defaults when the worker is online, then the user's uploads."""
        from compression.data_sources import calibration_suggestions

        options = calibration_suggestions(settings.COMPRESSOR_DATA_DIR or None)
        if self.user is not None:
            for upload in CalibrationUpload.objects.filter(owner=self.user)[:50]:
                options.append((upload.source, f"uploaded {upload.filename} ({upload.records} records)"))
        return options
