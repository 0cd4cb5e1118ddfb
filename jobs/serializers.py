"""REST API shapes. Request serializers check only the JSON structure (types, unknown fields);
everything about the job itself is validated by `jobs.submission.validate_submission`, the same
path the HTML form takes. Response serializers document and render the job rows."""
from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.reverse import reverse

from .models import CalibrationUpload, Job, JobEvent, Status

PRESET_OPTIONS = ("group_size", "actorder", "dampening_frac", "block_size", "ignore", "smoothing_strength",
                  "duo_scaling", "iters")
MAX_ROW_NUMBER = 2 ** 63 - 1  # offsets and ids beyond a signed 64-bit integer overflow the database driver
RECIPE_FORMS = ("preset", "yaml", "recipe")


class StrictSerializer(serializers.Serializer):
    """Refuses fields it does not declare, naming the first one, instead of silently dropping it."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                allowed = ", ".join(self.fields)
                raise serializers.ValidationError({unknown[0]: [f"unknown field; allowed: {allowed}"]})
        return super().to_internal_value(data)


# -- request -------------------------------------------------------------------------------------
@extend_schema_field({"oneOf": [{"type": "integer", "enum": [32, 64, 128]},
                                {"type": "string", "enum": ["channel"]}],
                      "description": "INT4 group size, or 'channel' for one scale per output row"})
class GroupSizeField(serializers.Field):
    def to_internal_value(self, data: Any) -> int | str:
        if data == "channel" or (isinstance(data, int) and not isinstance(data, bool)):
            return data
        raise serializers.ValidationError("must be 32, 64, 128 or 'channel'")

    def to_representation(self, value: Any) -> Any:
        return value


class RecipeInputSerializer(StrictSerializer):
    """Exactly one of: a preset (with its options), llm-compressor YAML, or a recipe dict."""

    preset = serializers.CharField(required=False, help_text="A name from GET /api/presets, e.g. W4A16")
    group_size = GroupSizeField(required=False)
    actorder = serializers.CharField(required=False, allow_null=True, help_text="GPTQ activation order: static, "
                                     "group, weight or null")
    dampening_frac = serializers.FloatField(required=False, min_value=0.0, max_value=1.0)
    block_size = serializers.IntegerField(required=False, min_value=1, max_value=4096)
    smoothing_strength = serializers.FloatField(required=False, min_value=0.0, max_value=1.0,
                                                help_text="SQ+W8A8: SmoothQuant alpha (default 0.8)")
    duo_scaling = serializers.JSONField(required=False, help_text="AWQ+W4A16_ASYM: true, false or 'both'")
    iters = serializers.IntegerField(required=False, min_value=0, max_value=100_000,
                                     help_text="AutoRound+W4A16(_ASYM): sign-SGD steps per decoder layer (default 200)")
    ignore = serializers.ListField(child=serializers.CharField(), required=False, max_length=200,
                                   help_text="Module names or re: patterns left uncompressed")
    yaml = serializers.CharField(required=False, trim_whitespace=False, max_length=100_000,  # recipe.MAX_YAML_CHARS
                                 help_text="An llm-compressor recipe in YAML")
    recipe = serializers.DictField(required=False, help_text="A recipe dict (Recipe.to_dict() or llm-compressor "
                                   "stage mapping)")

    def validate(self, attrs: dict) -> dict:
        forms = [name for name in RECIPE_FORMS if name in attrs]
        if len(forms) != 1:
            raise serializers.ValidationError("give exactly one of preset, yaml or recipe")
        options = [name for name in PRESET_OPTIONS if name in attrs]
        if options and forms[0] != "preset":
            raise serializers.ValidationError({options[0]: ["a preset option; only allowed with 'preset'"]})
        return attrs


class CalibrationInputSerializer(StrictSerializer):
    source = serializers.CharField(required=False, max_length=300,
                                   help_text="A data-directory file or a Hugging Face dataset id")
    samples = serializers.IntegerField(required=False, allow_null=True)
    seqlen = serializers.IntegerField(required=False, allow_null=True)
    calibrate_all_experts = serializers.BooleanField(
        required=False, help_text="MoE models: every expert's statistics see every calibration token (true) "
                                  "instead of only the tokens routed to it (false, the default)")


class IntOrAuto(serializers.Field):
    """An integer or the string "auto" (range checks happen in jobs.submission)."""

    def to_internal_value(self, data):
        if data == "auto":
            return data
        if isinstance(data, bool) or not isinstance(data, int):
            raise serializers.ValidationError('an integer or "auto"')
        return data

    def to_representation(self, value):
        return value


class EvaluationInputSerializer(StrictSerializer):
    tasks = serializers.ListField(child=serializers.CharField(), required=False, max_length=20,
                                  help_text="Task names; wikitext2_ppl is the quick perplexity")
    windows = serializers.IntegerField(required=False, allow_null=True)
    seqlen = serializers.IntegerField(required=False, allow_null=True)
    limit = serializers.IntegerField(required=False, allow_null=True)
    num_fewshot = serializers.IntegerField(required=False, allow_null=True)
    batch_size = IntOrAuto(required=False, allow_null=True,
                           help_text="lm-eval batch size: an integer, or \"auto\" (the largest that fits)")
    apply_chat_template = serializers.BooleanField(required=False)
    data_source = serializers.ChoiceField(choices=["auto", "local", "hub"], required=False)
    speed = serializers.BooleanField(required=False, help_text="Measure prefill/decode speed and memory of the "
                                                               "dense and the compressed model (default true)")


class JobCreateSerializer(StrictSerializer):
    model = serializers.CharField(max_length=500, trim_whitespace=False,
                                  help_text="'demo', a Hugging Face id (org/name[@revision]) or a local directory "
                                            "inside the allowed roots")
    name = serializers.CharField(required=False, allow_blank=True, max_length=200, default="")
    recipe = RecipeInputSerializer()
    calibration = CalibrationInputSerializer(required=False)
    evaluation = EvaluationInputSerializer(required=False)
    trust_remote_code = serializers.BooleanField(required=False, default=False)

    def submission_kwargs(self) -> dict[str, Any]:
        """The validated body as keyword arguments of `validate_submission`."""
        data = self.validated_data
        recipe = data["recipe"]
        kwargs: dict[str, Any] = {
            "model": data["model"], "name": data.get("name", ""), "trust_remote_code": data["trust_remote_code"],
            "calibration": dict(data.get("calibration") or {}), "evaluation": dict(data.get("evaluation") or {}),
        }
        if "yaml" in recipe:
            kwargs["recipe_yaml"] = recipe["yaml"]
        elif "recipe" in recipe:
            kwargs["recipe_dict"] = recipe["recipe"]
        else:
            kwargs["preset"] = recipe["preset"]
            kwargs["preset_options"] = {k: recipe[k] for k in PRESET_OPTIONS if k in recipe}
        return kwargs


class JobFilterSerializer(StrictSerializer):
    status = serializers.ChoiceField(choices=Status.values, required=False)
    model = serializers.CharField(required=False, max_length=500)
    limit = serializers.IntegerField(required=False, min_value=1, max_value=200,
                                     help_text="Page size (default 50); the answer's `next` link gives the next page")
    offset = serializers.IntegerField(required=False, min_value=0, max_value=MAX_ROW_NUMBER,
                                      help_text="Jobs to skip (default 0)")


class EventFilterSerializer(StrictSerializer):
    after = serializers.IntegerField(required=False, min_value=0, max_value=MAX_ROW_NUMBER, default=0,
                                     help_text="Only events with a larger id (tail with the last id you saw)")
    limit = serializers.IntegerField(required=False, min_value=1, max_value=500, default=100)


class CompareFilterSerializer(StrictSerializer):
    model = serializers.CharField(max_length=500, help_text="The model the jobs compressed, as submitted")


class RecommendFilterSerializer(StrictSerializer):
    model = serializers.CharField(max_length=500, help_text="A model as a job would name it: a Hub id, 'demo', "
                                                            "or a directory under the model roots")


# -- response ------------------------------------------------------------------------------------
class ErrorItemSerializer(serializers.Serializer):
    field = serializers.CharField(allow_null=True, help_text="Dotted path of the offending field, or null")
    message = serializers.CharField()


class ErrorSerializer(serializers.Serializer):
    errors = ErrorItemSerializer(many=True)


class JobLinksSerializer(serializers.Serializer):
    self = serializers.URLField()
    events = serializers.URLField()
    cancel = serializers.URLField()
    card = serializers.URLField()
    artifact = serializers.URLField()
    page = serializers.URLField()


class JobErrorSerializer(serializers.Serializer):
    type = serializers.CharField()
    message = serializers.CharField()


LINK_ROUTES = {"self": "api-job-detail", "events": "api-job-events", "cancel": "api-job-cancel",
               "card": "api-job-card", "artifact": "api-job-artifact", "page": "job-detail"}
_PLACEHOLDER = "00000000-0000-0000-0000-000000000000"


def _link_templates(request) -> dict[str, str]:
    """The job URLs with a placeholder id, reversed once per request (a list has many jobs)."""
    templates = getattr(request, "_job_link_templates", None)
    if templates is None:
        templates = {name: reverse(route, args=[_PLACEHOLDER], request=request) for name, route in LINK_ROUTES.items()}
        if request is not None:
            request._job_link_templates = templates
    return templates


def _links(job: Job, request) -> dict[str, str]:
    job_id = str(job.id)
    return {name: url.replace(_PLACEHOLDER, job_id) for name, url in _link_templates(request).items()}


class JobSummarySerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    display_name = serializers.CharField()
    model = serializers.CharField(source="model_source")
    recipe_name = serializers.CharField()
    status = serializers.ChoiceField(choices=Status.values)
    cancel_requested = serializers.BooleanField()
    progress = serializers.JSONField(help_text="{stage, fraction, message, layer, layers} while running")
    error = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    links = serializers.SerializerMethodField()

    @extend_schema_field(JobErrorSerializer(allow_null=True))
    def get_error(self, job: Job) -> dict | None:
        if not job.error_type and not job.error_message:
            return None
        return {"type": job.error_type, "message": job.error_message}

    @extend_schema_field(JobLinksSerializer)
    def get_links(self, job: Job) -> dict[str, str]:
        return _links(job, self.context.get("request"))


class JobDetailSerializer(JobSummarySerializer):
    trust_remote_code = serializers.BooleanField()
    recipe = serializers.JSONField(help_text="Recipe.to_dict(): {preset, preset_options, stages}")
    calibration = serializers.JSONField()
    evaluation = serializers.JSONField()
    results = serializers.JSONField(allow_null=True, help_text="Evaluation, size, timings ... once succeeded")
    heartbeat_at = serializers.DateTimeField(allow_null=True)
    artifact_bytes = serializers.IntegerField(allow_null=True)
    has_card = serializers.SerializerMethodField()

    @extend_schema_field(OpenApiTypes.BOOL)
    def get_has_card(self, job: Job) -> bool:
        return isinstance((job.results or {}).get("model_card"), str)


class JobPageSerializer(serializers.Serializer):
    count = serializers.IntegerField()
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = JobSummarySerializer(many=True)


class EventSerializer(serializers.ModelSerializer):
    class Meta:
        model = JobEvent
        fields = ["id", "created_at", "level", "stage", "message", "data"]


class EventPageSerializer(serializers.Serializer):
    results = EventSerializer(many=True)
    last_id = serializers.IntegerField(allow_null=True, help_text="Pass as ?after= to get only newer events")
    next = serializers.URLField(allow_null=True, help_text="Set when more events are waiting right now")


class PresetSerializer(serializers.Serializer):
    name = serializers.CharField()
    description = serializers.CharField()
    recipe = serializers.JSONField(help_text="Recipe.from_preset(name).to_dict()")
    yaml = serializers.CharField(help_text="The same recipe as llm-compressor YAML")


class PresetListSerializer(serializers.Serializer):
    presets = PresetSerializer(many=True)


class CompareJobSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField(help_text="Display name (job name, or recipe on model)")
    recipe_name = serializers.CharField()
    finished_at = serializers.DateTimeField(allow_null=True)
    recovery_pct = serializers.FloatField(allow_null=True, help_text="Mean recovery over the accuracy tasks "
                                          "(one metric each), else the perplexity recovery")
    recovery_kind = serializers.CharField(allow_null=True, help_text="'accuracy' or 'perplexity': what recovery_pct is")
    size_mb = serializers.FloatField(allow_null=True, help_text="Compressed weight bytes / 1e6")
    size = serializers.JSONField(allow_null=True, help_text="results.size: dense_bytes, "
                                 "compressed_weight_bytes, ratio")
    speedup = serializers.FloatField(allow_null=True, help_text="Compressed over dense decode speed, if measured")
    speed = serializers.JSONField(allow_null=True, help_text="results.speed as the worker recorded it")
    metrics = serializers.JSONField(help_text="results.evaluation.metrics rows")
    links = JobLinksSerializer()


class CompareSerializer(serializers.Serializer):
    model = serializers.CharField()
    jobs = CompareJobSerializer(many=True)


class RecommendSchemeSerializer(serializers.Serializer):
    preset = serializers.CharField()
    description = serializers.CharField()
    allowed = serializers.BooleanField(help_text="A job with this preset passes the pre-flight for this model")
    reason = serializers.CharField(allow_null=True, help_text="Why not (the pre-flight's error), when not allowed")
    bits = serializers.FloatField(help_text="Nominal stored bits per dense weight of the compressed Linears")
    group_sizes = serializers.ListField(child=serializers.JSONField(), required=False,
                                        help_text="Presets that take a group size: the sizes this model allows")


class RecommendBudgetSerializer(serializers.Serializer):
    bits = serializers.FloatField()
    label = serializers.CharField()
    best = serializers.JSONField(allow_null=True, help_text="The benchmark row with the lowest perplexity ratio "
                                                             "to dense among those this model allows")
    candidates = serializers.JSONField(help_text="Every benchmark row of this bit budget, best first")


class RecommendSerializer(serializers.Serializer):
    model = serializers.CharField()
    architecture = serializers.CharField()
    layers = serializers.IntegerField()
    input_widths = serializers.ListField(child=serializers.IntegerField())
    schemes = RecommendSchemeSerializer(many=True)
    budgets = RecommendBudgetSerializer(many=True)
    benchmark = serializers.JSONField(allow_null=True, help_text="Where the quality numbers come from")


class CalibrationUploadSerializer(serializers.ModelSerializer):
    source = serializers.CharField(read_only=True, help_text="Pass this as calibration.source of a new job")

    class Meta:
        model = CalibrationUpload
        fields = ["id", "source", "filename", "size", "records", "sha256", "created_at"]
        read_only_fields = fields


class CalibrationUploadListSerializer(serializers.Serializer):
    results = CalibrationUploadSerializer(many=True)
    max_bytes = serializers.IntegerField(help_text="The largest file the server accepts")


class CalibrationUploadRequestSerializer(serializers.Serializer):
    file = serializers.FileField(help_text="A .jsonl (one JSON record per line: text, instruction/output or "
                                           "chat messages), .json (a list of records) or .txt file, UTF-8")
