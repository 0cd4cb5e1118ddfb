from jobs.models import Job


def fp8_recipe() -> dict:
    from compression.recipe import Recipe

    return Recipe.from_preset("FP8_DYNAMIC").to_dict()


def make_job(owner, **fields) -> Job:
    defaults = {"model_source": "demo", "recipe": fp8_recipe(), "recipe_name": "FP8_DYNAMIC",
                "evaluation": {"tasks": ["wikitext2_ppl"], "windows": 1, "seqlen": 64}}
    defaults.update(fields)
    return Job.objects.create(owner=owner, **defaults)
