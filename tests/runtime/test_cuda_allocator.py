"""Plan.allocator becomes PYTORCH_CUDA_ALLOC_CONF for memplan train's processes and the launch lines it writes."""

import yaml

from memplan.runtime.cuda_allocator import ALLOC_CONF_ENV, allocator_conf, apply, launch_prefix


def test_expandable_is_added_and_the_users_other_options_are_kept():
    assert allocator_conf("expandable", None) == "expandable_segments:True"
    assert allocator_conf("expandable", "garbage_collection_threshold:0.6") == \
        "garbage_collection_threshold:0.6,expandable_segments:True"
    assert allocator_conf("expandable", "expandable_segments:False") == "expandable_segments:True"
    # the default allocator: the plan's estimate assumes no expandable segments
    assert allocator_conf("default", "expandable_segments:True,max_split_size_mb:128") == "max_split_size_mb:128"
    assert allocator_conf("default", None) is None


def test_apply_sets_or_clears_the_variable():
    env = {ALLOC_CONF_ENV: "expandable_segments:True"}
    apply("default", env)
    assert ALLOC_CONF_ENV not in env
    apply("expandable", env)
    assert env[ALLOC_CONF_ENV] == "expandable_segments:True"
    assert launch_prefix("default") == "" and launch_prefix("expandable").startswith(ALLOC_CONF_ENV + "=")


def test_written_launch_lines_run_the_plans_allocator():
    from memplan.catalog.resolve import resolve_model
    from memplan.plan import Plan
    from memplan.recommend.writers import render_files

    plan = Plan(model="llama-2-7b", gpus=4, sharding="deepspeed", zero=3, precision="bf16-master",
                allocator="expandable")
    files = render_files("run", plan, resolve_model("llama-2-7b"), [], "127.0.0.1")
    assert yaml.safe_load(files["plan.yaml"])["allocator"] == "expandable"
    assert f"{ALLOC_CONF_ENV}=expandable_segments:True accelerate launch" in files["README.md"]
    assert files["accelerate_config.yaml"].startswith(f"# {ALLOC_CONF_ENV}=expandable_segments:True")
    default = render_files("run", plan.model_copy(update={"allocator": "default"}), resolve_model("llama-2-7b"),
                           [], "127.0.0.1")
    assert ALLOC_CONF_ENV not in default["README.md"] + default["accelerate_config.yaml"]
