"""The estimate command as a user meets it: tables, --json, and one clear line with exit 2 on bad input."""

import json

import pytest


def test_main_job_table(run_cli):
    code, out, _ = run_cli("estimate", "--model", "llama-7b", "--gpus", "4")
    assert code == 0
    assert "llama-1-7b: 6,738,415,616 parameters on 4 GPU(s)" in out
    for row in ("full FT · DDP · amp-bf16", "ZeRO-3 + offload optimizer", "LoRA r16", "QLoRA r16"):
        assert row in out
    assert "best plan:" in out and "peak allocated" in out and "GiB" in out


def test_table_json_has_every_plan(run_cli):
    code, out, _ = run_cli("estimate", "--model", "llama-2-7b", "--gpus", "2", "--json")
    data = json.loads(out)
    assert code == 0 and data["model"] == {"name": "llama-2-7b", "params_total": 6738415616}
    assert len(data["results"]) == 10 and all(r["plan"]["gpus"] == 2 for r in data["results"])


def test_single_plan_json(run_cli):
    code, out, _ = run_cli("estimate", "--model", "qwen2.5-7b", "--method", "lora", "--lora-rank", "8",
                           "--lora-targets", "q_proj,v_proj", "--batch-size", "5", "--seq-len", "1024",
                           "--no-grad-ckpt", "--gpu", "a100-80gb", "--json")
    data = json.loads(out)
    (r,) = data["results"]
    assert r["plan"]["lora"] == {"rank": 8, "alpha": 32.0, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}
    assert r["plan"]["micro_batch"] == 5 and r["plan"]["grad_ckpt"] is False
    # 77.60 GiB: within the GPU's 80 GiB, not within the 72 GiB left by the default 10 % headroom
    assert code == 1 and r["fits"] is False and r["gpu_memory_bytes"] == 81920 * 2**20
    assert r["fit"]["usable_bytes"] == int(81920 * 2**20 * 0.9)


def test_config_file_and_flags_override(tmp_path, run_cli):
    cfg = tmp_path / "plan.yaml"
    cfg.write_text("model: mistral-7b\nmethod: lora\nmicro_batch: 2\nseq_len: 4096\n")
    code, out, _ = run_cli("estimate", "--config", str(cfg), "--batch-size", "4", "--json")
    (r,) = json.loads(out)["results"]
    assert code == 0 and r["plan"]["model"] == "mistral-7b" and r["plan"]["micro_batch"] == 4
    assert r["plan"]["seq_len"] == 4096


def test_max_batch_and_seq(run_cli):
    code, out, _ = run_cli("estimate", "--model", "llama-3-8b", "--method", "lora", "--precision", "bf16",
                           "--gpu-memory", "26GiB", "--max-batch", "--max-seq", "--json")
    data = json.loads(out)
    assert code == 0 and data["max_batch"] >= 1 and data["max_seq"] > 2048


def test_no_gpu_shows_common_sizes(run_cli):
    code, out, _ = run_cli("estimate", "--model", "llama-3.2-1b", "--method", "qlora", "--precision", "bf16")
    assert code == 0 and "fits GPUs of 16 GiB" in out


@pytest.mark.parametrize("args, needle", [
    (["--model", "llama7b"], "unknown model 'llama7b'"),
    (["--model", "llama-2-7b", "--batch-size", "0"], "--batch-size 0: must be greater than 0"),
    (["--model", "llama-2-7b", "--seq-len", "-1"], "--seq-len -1: must be greater than 0"),
    (["--model", "llama-2-7b", "--method", "lora", "--lora-targets", "q_proj,x_proj"], "LoRA target 'x_proj'"),
    (["--model", "llama-2-7b", "--gpu", "h10"], "unknown GPU 'h10'"),
    (["--model", "llama-2-7b", "--gpu-memory", "lots"], "lots"),
    (["--model", "llama-2-7b", "--method", "qlora", "--precision", "fp32"], "Hint:"),
    (["--model", "llama-2-7b", "--offload", "optimizer"], "Hint:"),
    (["--model", "llama-2-7b", "--method", "lora", "--max-batch"], "--gpu"),
    ([], "no model"),
    (["--model", "mixtral-8x7b", "--method", "lora"], "--lora-dropout 0"),
    # peft turns gate_proj/up_proj/down_proj targets into DeepSeek's expert stacks: the hint leaves them out
    (["--model", "deepseek-r1", "--method", "lora"], "--lora-targets q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj,gate\n"),
    (["--model", "deepseek-r1", "--method", "lora", "--lora-targets", "q_a_proj,down_proj"], "--lora-dropout 0"),
])
def test_bad_input_is_one_line_and_exit_2(run_cli, args, needle):
    code, out, err = run_cli("estimate", *args)
    assert code == 2, (out, err)
    assert needle in err
    assert err.startswith("memplan: error:") and err.count("\n") == 1


def test_closest_names_suggested(run_cli):
    _, _, err = run_cli("estimate", "--model", "llama7b")
    assert "llama-7b" in err


def test_malformed_files(tmp_path, run_cli):
    bad_cfg = tmp_path / "config.json"
    bad_cfg.write_text("{not json")
    code, _, err = run_cli("estimate", "--model", str(bad_cfg))
    assert code == 2 and str(bad_cfg) in err
    bad_plan = tmp_path / "plan.yaml"
    bad_plan.write_text("model: llama-2-7b\nmethod: [oops\n")
    code, _, err = run_cli("estimate", "--config", str(bad_plan))
    assert code == 2 and "malformed YAML" in err


def test_local_model_directory(tmp_path, run_cli):
    from support import preset_config

    (tmp_path / "config.json").write_text(json.dumps(preset_config("qwen2.5-0.5b")))
    code, out, _ = run_cli("estimate", "--model", str(tmp_path), "--method", "lora", "--json")
    assert code == 0 and json.loads(out)["model"]["params_total"] == 494032768


def test_models_and_gpus_lists(run_cli):
    code, out, _ = run_cli("models", "--json")
    rows = json.loads(out)["presets"]
    assert code == 0 and len(rows) >= 25 and {"llama-2-7b", "mixtral-8x7b", "gpt2"} <= {r["id"] for r in rows}
    code, out, _ = run_cli("gpus")
    assert code == 0 and "h100-80gb" in out


def test_help_states_units_and_defaults(run_cli):
    code, out, _ = run_cli("estimate", "--help")
    assert code == 0
    for needle in ("GiB", "--batch-size", "[tokens] (default: 2048)", "--grad-ckpt / --no-grad-ckpt", "(default: 16)"):
        assert needle in out, needle


def _option_help():
    """(command, option, its help line as --help prints it, its default) for every option of every command."""
    import click

    for name, command in _commands():
        ctx = click.Context(command, info_name=name)
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                yield name, param, " ".join(param.get_help_record(ctx)[1].split()), param.get_default(ctx, call=False)


def _plan_field(param):
    from memplan.cli.options import _field

    return _field(param.name.removeprefix("opt_").replace("__", ".")) if param.name.startswith("opt_") else None


def test_every_default_is_stated_once():
    """Each option states its default once, as (default: X): click's default, the plan field's for plan flags,
    or what the command chooses; no description repeats it."""
    def stated(value) -> str:
        if isinstance(value, bool):
            return "(default: on)" if value else "(default: off)"
        return f"(default: {value:g})" if isinstance(value, float) else f"(default: {value})"

    for command, param, text, default in _option_help():
        where = f"{command} {param.opts[0]}: {text}"
        # (a choice may be named "default": --allocator's is)
        assert text.lower().replace("(default: default)", "(default: )").count("default") <= 1, where
        field = _plan_field(param)
        if field is not None:
            default = field.default if field.default_factory is None else None
        if param.is_flag and field is None or not isinstance(default, (int, float, str)) or param.required:
            continue
        assert "(default: " in text, where
        if not text.split("(default: ")[1].startswith("chosen"):  # recommend's lr and warmup: computed
            assert stated(default) in text, where


#: Numbers without a unit: a stage, a rank, a scale, a probability, a learning rate and fractions.
DIMENSIONLESS = {"--zero", "--lora-rank", "--lora-alpha", "--lora-dropout", "--lr", "--warmup-ratio", "--headroom"}


def test_every_number_states_its_unit():
    import re

    import click

    for command, param, text, _ in _option_help():
        numeric = isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType))
        if numeric and param.opts[0] not in DIMENSIONLESS:
            assert re.search(r"\[(?!required)[A-Za-z][A-Za-z -]*\]", text), f"{command} {param.opts[0]}: {text}"


def test_help_speaks_of_the_decision_tree_not_its_source(run_cli):
    for name in ["", *(n for n, _ in _commands())]:
        code, out, _ = run_cli(*([name] if name else []), "--help")
        assert code == 0 and "seed" not in out.lower(), name


def test_recommend_says_how_it_chooses_lr_and_warmup(run_cli):
    helps = {param.opts[0]: text for command, param, text, _ in _option_help() if command == "recommend"}
    warmup = helps["--warmup-ratio"]
    assert "0.05" not in warmup and "2/(1-beta2) = 2,000 steps" in warmup and "3-10 % of the total steps" in warmup
    assert "recommended range 1e-5 to 5e-5" in helps["--lr"] and "halved for --domain-shift high" in helps["--lr"]



def test_bad_values_name_the_flag_or_the_file_key(tmp_path, run_cli):
    code, _, err = run_cli("estimate", "--model", "demo-tiny", "--batch-size", "0")
    assert code == 2 and err == "memplan: error: --batch-size 0: must be greater than 0\n"
    code, _, err = run_cli("estimate", "--model", "demo-tiny", "--lora-rank", "0", "--lora-dropout", "1")
    assert code == 2 and err.splitlines() == ["memplan: error: --lora-rank 0: must be greater than 0",
                                             "memplan: error: --lora-dropout 1: must be less than 1"]
    plan = tmp_path / "plan.yaml"
    plan.write_text("model: demo-tiny\nmicro_batch: 0\nmethod: qlorra\nlora:\n  rnak: 8\n")
    code, _, err = run_cli("estimate", "--config", str(plan))
    assert code == 2 and sorted(err.splitlines()) == sorted([
        f"memplan: error: {plan}: micro_batch: must be greater than 0 (got 0)",
        f"memplan: error: {plan}: method: must be 'full', 'lora', 'qlora' or 'lora-8bit'; did you mean 'qlora'? (got 'qlorra')",
        f"memplan: error: {plan}: unknown key 'lora.rnak'; did you mean 'rank'?; allowed keys under lora: rank, alpha, "
        "dropout, targets"])
    # a flag overrides the file's bad value; the file's other problems remain, named in the file
    code, _, err = run_cli("estimate", "--config", str(plan), "--batch-size", "2", "--method", "lora", "--seq-len", "0")
    assert code == 2 and "micro_batch" not in err and "method" not in err
    assert "memplan: error: --seq-len 0: must be greater than 0" in err.splitlines()


def test_unknown_model_lists_each_close_preset_once():
    """The message a hub id missing from the Hub gets (tests/catalog/test_hub.py runs that against a
    stand-in Hub); built directly here, since an uncached hub id would otherwise be looked up online."""
    from memplan.catalog.resolve import _unknown

    err = str(_unknown("Qwen/Qwen2.5-7B-Instruct", " (no such repository)"))
    assert "\n" not in err
    closest = err.split("Closest presets: ", 1)[1].split(" (run `memplan models`")[0]
    ids = [name.split(" (")[0] for name in closest.split(", ")]
    assert ids[0] == "qwen2.5-7b" and closest.startswith("qwen2.5-7b (Qwen/Qwen2.5-7B)")
    assert len(ids) == len(set(ids)) == 5


def _commands():
    import click

    from memplan.cli import main

    ctx = click.Context(main)
    return [(name, main.get_command(ctx, name)) for name in main.list_commands(ctx)]


def _mistyped(choice: str) -> str:
    return choice[:-1] + choice[-1] * 2  # "qlora" -> "qloraa"


def test_usage_errors_are_one_line_on_every_command(run_cli):
    import click

    seen_choice = seen_number = 0
    for name, command in _commands():
        code, out, err = run_cli(name, "--help")
        assert code == 0 and out.startswith(f"Usage: memplan {name}"), name
        code, _, err = run_cli(name, "--no-such-flag")
        assert code == 2 and err == (f"memplan: error: {name}: no such option --no-such-flag (see `memplan {name} "
                                     "--help` for the options)\n"), err
        for param in command.params:
            if not isinstance(param, click.Option) or param.is_flag or param.name == "help":
                continue
            flag = param.opts[0]
            if isinstance(param.type, click.Choice):
                seen_choice += 1
                choices = [str(c) for c in param.type.choices]
                code, _, err = run_cli(name, flag, _mistyped(choices[-1]))
                assert code == 2 and err == (f"memplan: error: {flag}: '{_mistyped(choices[-1])}' is not one of "
                                             f"{', '.join(choices)}; did you mean '{choices[-1]}'?\n"), err
                code, _, err = run_cli(name, flag)
                assert code == 2 and err == (f"memplan: error: {name}: option '{flag}' requires an argument: one of "
                                             f"{', '.join(choices)}\n"), err
            elif isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)):
                seen_number += 1
                code, _, err = run_cli(name, flag, "many")
                kind = "integer" if isinstance(param.type, click.types.IntParamType) else "float"
                assert code == 2 and err.count("\n") == 1, err
                assert err.startswith(f"memplan: error: {flag}: 'many' is not a valid {kind}"), err
                # finite and bounded as plan numbers are (memplan.plan.MAX_NUMBER): no overflow further on
                finite, bounded = ("is not a finite number",) * 2 if kind == "float" else \
                    ("is not a valid integer", "is more than 2,147,483,647")
                for bad, why in (("inf", finite), ("1" + "0" * 400, bounded)):
                    code, _, err = run_cli(name, flag, bad)
                    assert code == 2 and err.count("\n") == 1 and why in err, err
    assert seen_choice >= 10 and seen_number >= 10


def test_missing_argument_and_unknown_command(run_cli):
    code, _, err = run_cli("train")
    assert code == 2 and err == ("memplan: error: train: missing argument PLAN.yaml (usage: memplan train [OPTIONS] "
                                 "PLAN.yaml)\n")
    code, _, err = run_cli("estimat")
    assert code == 2 and err == ("memplan: error: no such command 'estimat'; did you mean 'estimate'? (commands: "
                                 "estimate, gpus, models, profile, recommend, serve, train)\n")
    code, _, err = run_cli("recommend", "--gpus", "2")
    assert code == 2 and err == "memplan: error: recommend: missing option --model / -m (see `memplan recommend --help`)\n"
    code, _, err = run_cli("--bogus")
    assert code == 2 and err == "memplan: error: no such option --bogus (see `memplan --help` for the options)\n"
    code, out, _ = run_cli("--help")
    assert code == 0 and "Commands:" in out
