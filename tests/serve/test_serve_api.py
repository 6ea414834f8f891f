"""memplan serve's JSON API and page without a browser: its figures are the commands' --json, bad input is a
4xx with the command's message (never a 500), and `memplan estimate --html` writes the same view."""

from __future__ import annotations

import io
import json
import math
import random
import re
import subprocess
import sys
import zipfile

import pytest

from memplan.report.units import gib
from memplan.serve import form
from memplan.serve.app import create_app

from support import REPO


@pytest.fixture(scope="module")
def client():
    return create_app().test_client()


def _cli_json(run_cli, *args: str) -> dict:
    code, out, err = run_cli(*args, "--json")
    assert code in (0, 1), err
    return json.loads(out)


@pytest.mark.parametrize("options", [
    {"model": "llama-7b", "gpus": 4},
    {"model": "llama-7b", "gpus": 4, "gpu": "a100-80gb"},
    {"model": "llama-3-8b", "method": "lora", "batch-size": 4, "gpu": "a100-80gb", "max-batch": True, "max-seq": True},
    {"model": "llama-3-8b", "method": "qlora", "precision": "bf16", "grad-ckpt": False, "gpu-memory": "24GiB",
     "lora-targets": "q_proj,v_proj", "loss": "chunked"},
])
def test_api_estimate_is_the_commands_json(client, run_cli, options):
    args = []
    for key, value in options.items():
        if isinstance(value, bool):
            args += [f"--{key}" if value else f"--no-{key}"]
        else:
            args += [f"--{key}", str(value)]
    expected = _cli_json(run_cli, "estimate", *args)
    assert client.post("/api/estimate", json=options).json == expected
    query = {k: ("on" if v is True else "off" if v is False else v) for k, v in options.items()}
    assert client.get("/api/estimate", query_string=query).json == expected


BAD = [  # (JSON body, the field blamed, the command line giving the same message or None)
    ({"model": "llama-7b", "batch-size": 0}, "batch-size", ["--batch-size", "0"]),
    ({"model": "llama-7b", "batch-size": "abc"}, "batch-size", ["--batch-size", "abc"]),
    ({"model": "llama-7b", "gpus": 10**13}, "gpus", ["--gpus", str(10**13)]),
    ({"model": "llama-7b", "headroom": "nan"}, "headroom", ["--headroom", "nan"]),
    ({"model": "llama-7b", "method": "qlorra"}, "method", ["--method", "qlorra"]),
    ({"model": "llama7b"}, "model", []),
    ({"model": "llama-7b", "gpu": "h200000"}, "gpu", ["--gpu", "h200000"]),
    ({"model": "llama-7b", "gpu-memory": "12XB"}, "gpu-memory", ["--gpu-memory", "12XB"]),
    ({"model": "llama-7b", "method": "lora", "lora-targets": "foo"}, "lora-targets",
     ["--method", "lora", "--lora-targets", "foo"]),
    ({"model": "llama-7b", "zero": 2}, None, ["--zero", "2"]),
    ({"model": "a" * 300}, "model", []),
    ({"gpus": 4}, "model", None),
    ({"model": "llama-7b", "foo": 1}, None, None),
    ({"model": "llama-7b", "gpus": [4]}, "gpus", None),
    ({"model": "llama-7b", "gpus": {"a": 1}}, "gpus", None),
    ({"model": "llama-7b", "grad-ckpt": "maybe"}, "grad-ckpt", None),
    ({"model": "llama-7b", "max-batch": True}, None, ["--max-batch"]),
    ({"model": "x" * 5000}, "model", None),
]


@pytest.mark.parametrize(("body", "field", "args"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_a_400_with_the_commands_message(client, run_cli, body, field, args):
    r = client.post("/api/estimate", json=body)
    assert r.status_code == 400
    problems = r.json["errors"]
    assert problems[0]["field"] == field and r.json["error"]
    if args is not None:
        code, _, err = run_cli("estimate", "--model", body["model"], *args)
        assert code == 2
        assert [p["message"] for p in problems] == [line.removeprefix("memplan: error: ")
                                                    for line in err.splitlines()]


@pytest.mark.parametrize("body", [b"garbage", b"[1, 2]", b'"text"', b"\xff\xfe", b"{" * 5000, b"1" * 5000,
                                  b'{"model": "llama-7b", "gpus": 1e999}', b""])
def test_a_body_that_is_no_json_object_is_a_400(client, body):
    r = client.post("/api/estimate", data=body)
    assert r.status_code == 400 and r.json["error"]


def _random_value(rng: random.Random):
    return rng.choice([0, -1, 1, 2**31, 10**30, -(10**30), 0.5, -0.0, 1e308, True, False, None, "", " ", "x",
                       "0", "1e400", "inf", "-nan", "24GiB", "on", "\x00", "é" * 3, "a/b", "../../etc/passwd",
                       [1], {}, "lora", "deepspeed", "3", "optimizer+params", "cpu", "flash", "fp32"])


def test_random_values_never_give_a_500(client):
    """Every field with values of every kind, a few at a time: 200 (it estimated) or 400 (the message)."""
    rng = random.Random(7)
    keys = list(form.fields())
    for _ in range(150):
        body = {"model": rng.choice(["llama-7b", "gpt2", "qwen3-8b"])}
        body.update({k: _random_value(rng) for k in rng.sample(keys, 3)})
        r = client.post("/api/estimate", json=body)
        assert r.status_code in (200, 400), (body, r.json)
        page = client.get("/", query_string={k: json.dumps(v) if not isinstance(v, str) else v
                                             for k, v in body.items()})
        assert page.status_code in (200, 400), body


def test_a_nul_character_is_refused_in_any_field(client):
    for body, field in (({"model": "llama-7b\x00"}, "model"), ({"model": "llama-7b", "gpu": "a100\x00"}, "gpu"),
                        ({"model": "llama-7b", "dataset-size": "1000", "max-hours": "3\x00"}, "max-hours")):
        r = client.post("/api/estimate" if field != "max-hours" else "/api/recommend", json=body)
        assert r.status_code == 400 and r.json["errors"] == [
            {"field": field, "message": f"--{field}: {body[field]!r} holds a NUL character"}], r.json
        assert client.get("/", query_string=body).status_code == 400


def test_the_page_shows_the_message_next_to_its_field(client, run_cli):
    r = client.get("/?model=llama-7b&gpus=4&batch-size=0")
    assert r.status_code == 400
    _, _, err = run_cli("estimate", "--model", "llama-7b", "--batch-size", "0")
    message = err.strip().removeprefix("memplan: error: ")
    assert re.search(r'id="error-batch-size">([^<]*)<', r.text).group(1) == message
    assert 'value="0"' in r.text  # what was typed stays in its field


def test_the_landing_page_is_the_readmes_first_command(client):
    r = client.get("/")
    assert r.status_code == 302 and r.location == "/?model=llama-7b&gpus=4"


def test_the_page_loads_nothing_from_the_network(client):
    html = client.get("/?model=llama-7b&gpus=4&gpu=a100-80gb&dataset-size=20000").text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert "<svg" in html and "<script>" in html


def test_recommend_answers_as_the_command_and_zips_its_files(client, run_cli, tmp_path):
    options = ["--model", "llama-7b", "--gpus", "4", "--gpu", "a100-80gb", "--dataset-size", "20000"]
    expected = _cli_json(run_cli, "recommend", *options)
    query = {"model": "llama-7b", "gpus": "4", "gpu": "a100-80gb", "dataset-size": "20000"}
    assert client.get("/api/recommend", query_string=query).json == dict(expected)
    code, _, err = run_cli("recommend", *options, "-o", str(tmp_path / "memplan-plan"))
    assert code == 0, err
    z = zipfile.ZipFile(io.BytesIO(client.get("/download/recommended.zip", query_string=query).data))
    written = {f"memplan-plan/{p.name}": p.read_text() for p in (tmp_path / "memplan-plan").iterdir()}
    # the same files; the paths they name are the directory's as given (here: a temporary one)
    assert sorted(z.namelist()) == sorted(written)
    assert z.read("memplan-plan/plan.yaml").decode() == written["memplan-plan/plan.yaml"].replace(
        str(tmp_path / "memplan-plan"), "memplan-plan")


def test_an_uploaded_config_is_the_model(client, run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path))
    text = (REPO / "data" / "models" / "qwen3-8b" / "config.json").read_text()
    r = client.post("/api/upload", data=text)
    assert r.status_code == 200
    path = r.json["model"]
    assert path.startswith(str(tmp_path / "uploads")) and open(path).read() == text
    assert client.get("/api/estimate", query_string={"model": path}).json == _cli_json(run_cli, "estimate",
                                                                                       "--model", path)
    bad = client.post("/api/upload", data='{"model_type": "nope"}')
    assert bad.status_code == 400 and "nope" in bad.json["error"]


def test_estimate_html_writes_the_view_in_one_file(run_cli, tmp_path):
    out = tmp_path / "plan.html"
    code, _, err = run_cli("estimate", "--model", "llama-3-8b", "--method", "lora", "--gpu", "a100-80gb",
                           "--html", str(out))
    assert code == 0, err
    expected = _cli_json(run_cli, "estimate", "--model", "llama-3-8b", "--method", "lora", "--gpu", "a100-80gb",
                         "--max-batch", "--max-seq")
    html = out.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["plan.html"]  # nothing left behind by the atomic write
    assert "<script" not in html and not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert f'id="max-batch">{expected["max_batch"]}<' in html and f'id="max-seq">{expected["max_seq"]}<' in html
    total = expected["results"][0]["total_bytes"]
    assert f'data-bytes="{total}"' in html and gib(total) in html
    code, _, err = run_cli("estimate", "--model", "llama-7b", "--html", str(tmp_path / "no" / "such" / "x.html"))
    assert code == 2 and err.startswith("memplan: error: --html ") and "\n" == err[-1] and err.count("\n") == 1


def test_estimate_html_of_a_trainers_config_shows_its_plan(run_cli, tmp_path):
    config = REPO / "tests/trainers/configs/torchtune/recipes/configs/llama3_1/8B_lora_single_device.yaml"
    out = tmp_path / "plan.html"
    code, _, err = run_cli("estimate", "--config", str(config), "--gpu", "a100-80gb", "--html", str(out))
    assert code in (0, 1), err
    total = _cli_json(run_cli, "estimate", "--config", str(config), "--gpu", "a100-80gb")["results"][0]["total_bytes"]
    assert f'data-bytes="{total}"' in out.read_text()


def test_serve_prints_its_address_and_answers():
    proc = subprocess.Popen([sys.executable, "-m", "memplan", "serve", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        from urllib.request import urlopen

        with urlopen(url + "api/estimate?model=gpt2") as r:
            assert json.load(r)["model"]["name"] == "gpt2"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "70000"], "--port 70000: a TCP port is 0 to 65535"),
    (["--port", "-1"], "--port: -1 is less than 0, the smallest allowed"),
])
def test_serve_refuses_a_port_it_cannot_take(run_cli, args, message):
    code, _, err = run_cli("serve", *args)
    assert (code, err) == (2, f"memplan: error: {message}\n")


def test_a_model_name_longer_than_a_file_name_is_one_error_line(run_cli):
    code, _, err = run_cli("estimate", "--model", "a" * 300)
    assert code == 2 and err.startswith("memplan: error: unknown model 'aaa") and err.count("\n") == 1
    assert math.isfinite(len(err))
