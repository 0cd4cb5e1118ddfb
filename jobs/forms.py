"""The new-job form. Recipe validation and the pre-flight check are the engine's; this only maps
their errors onto the fields the user filled in."""
from __future__ import annotations

from django import forms
from django.conf import settings

from .models import ACTIVE, Job

GROUP_SIZE_CHOICES = [("", "preset default"), ("32", "32"), ("64", "64"), ("128", "128"),
                      ("channel", "per output channel")]


def preset_choices() -> list[tuple[str, str]]:
    from compression.recipe import PRESETS

    return [(name, f"{name} — {description}") for name, description in PRESETS.items()]


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
        required=False, widget=forms.Textarea(attrs={"rows": 8, "spellcheck": "false"}),
        help_text="Optional llm-compressor-style recipe YAML; when given it replaces the preset.")
    calibration_samples = forms.IntegerField(min_value=1, max_value=4096, initial=128)
    calibration_seqlen = forms.IntegerField(min_value=16, max_value=8192, initial=512)
    eval_windows = forms.IntegerField(
        min_value=1, max_value=1000, initial=8,
        help_text="WikiText-2 test windows of 512 tokens scored for perplexity (baseline and compressed).")

    def __init__(self, *args, user=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user
        self.fields["preset"].choices = preset_choices()
        self.recipe = None

    def clean_model(self) -> str:
        from compression.loading import ModelSourceError, check_model_source

        value = self.cleaned_data["model"].strip()
        try:
            check_model_source(value, allowed_roots=settings.COMPRESSOR_MODEL_ROOTS)
        except ModelSourceError as exc:
            raise forms.ValidationError(exc.message) from None
        return value

    def clean(self) -> dict:
        from compression.loading import ModelSourceError, load_config
        from compression.preflight import preflight
        from compression.recipe import Recipe, RecipeError

        data = super().clean()
        if self.user is not None:
            active = Job.objects.filter(owner=self.user, status__in=ACTIVE).count()
            if active >= settings.COMPRESSOR_MAX_QUEUED_PER_USER:
                raise forms.ValidationError(
                    f"you already have {active} queued or running jobs (limit "
                    f"{settings.COMPRESSOR_MAX_QUEUED_PER_USER}); wait for one to finish or cancel one")
        if self.errors:
            return data
        yaml_text = (data.get("recipe_yaml") or "").strip()
        try:
            if yaml_text:
                recipe = Recipe.from_yaml(yaml_text)
            else:
                options = {}
                if data.get("group_size"):
                    if not data["preset"].endswith("W4A16"):
                        self.add_error("group_size", "a group size applies only to the W4A16 presets")
                        return data
                    options["group_size"] = None if data["group_size"] == "channel" else int(data["group_size"])
                recipe = Recipe.from_preset(data["preset"], **options)
        except RecipeError as exc:
            self.add_error("recipe_yaml" if yaml_text else "preset", f"{exc.field}: {exc.message}")
            return data
        try:
            config = load_config(data["model"], allowed_roots=settings.COMPRESSOR_MODEL_ROOTS,
                                 trust_remote_code=bool(data.get("trust_remote_code")))
            self.preflight = preflight(config, recipe)
        except ModelSourceError as exc:
            self.add_error("model", exc.message)
            return data
        except RecipeError as exc:
            target = "recipe_yaml" if yaml_text else ("group_size" if "group" in exc.field else "preset")
            self.add_error(target, f"{exc.field}: {exc.message}")
            return data
        self.recipe = recipe
        return data

    def create_job(self, owner) -> Job:
        data = self.cleaned_data
        return Job.objects.create(
            owner=owner, name=data.get("name", ""), model_source=data["model"],
            trust_remote_code=bool(data.get("trust_remote_code")),
            recipe=self.recipe.to_dict(), recipe_name=self.recipe.preset or "custom",
            calibration={"source": "calibration/self_instruct_seed_tasks.jsonl",
                         "samples": data["calibration_samples"], "seqlen": data["calibration_seqlen"]},
            evaluation={"tasks": ["wikitext2_ppl"], "windows": data["eval_windows"], "seqlen": 512},
        )
