"""The web app of `memplan serve` (Flask): the page, its JSON API and the downloads.

    GET  /                          the page; its query string is the plan (/?model=llama-7b&gpus=4)
    GET  /api/estimate?...          `memplan estimate --json` for the same options (POST: a JSON object)
    GET  /api/recommend?...         `memplan recommend --json` (POST: a JSON object)
    POST /api/upload                a config.json (the body) kept in memplan's cache; answers {"model": path}
    GET  /download/recommended.zip  the files `memplan recommend -o memplan-plan` writes, zipped in memory

Bad input is a 400 with the command line's message, {"error": ..., "errors": [{"field", "message"}]}; the page
shows each message next to its field. Why Flask: one small, long-kept, synchronous framework (Werkzeug's
threaded server, Jinja2's escaping templates, request size limits) for a page whose work is synchronous
arithmetic; it adds 5 MB and about a second to the plain install (README, *memplan serve*).
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from memplan.errors import UserError
from memplan.serve import form, render, view

#: The largest request body taken: a config.json or a JSON object of options is a few kilobytes.
MAX_BODY = 1 << 20


def _values(pairs: Iterable[tuple[str, Any]]) -> dict[str, str]:
    return form.read_values(pairs)


def _json_body(request) -> dict[str, str]:
    """The options of a POST: a JSON object of field keys (the flags without dashes) to values."""
    from memplan.files import parse_json

    try:
        text = request.get_data(cache=False).decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"the request body is not UTF-8 text (byte {err.start}): send a JSON object") from None
    data = parse_json(text, "request body")
    if not isinstance(data, dict):
        raise UserError(f"request body: a JSON object of options is expected, got {type(data).__name__} "
                        "(e.g. {\"model\": \"llama-7b\", \"gpus\": 4})")
    return _values(data.items())


def _api_values(request) -> dict[str, str]:
    if request.method == "POST":
        return _json_body(request)
    return _values(request.args.items(multi=True))


def _problem(err: UserError) -> dict:
    problems = err.problems if isinstance(err, form.InputErrors) else [(None, line) for line in str(err).splitlines()]
    return {"error": str(err), "errors": [{"field": key, "message": message} for key, message in problems]}


def store_upload(text: str) -> Path:
    """A config.json sent to the page, checked as `--model` reads one and kept in memplan's cache under the hash
    of its text (`uploads/<hash>/config.json`), so that the page's address can name it as the model."""
    from memplan.catalog.cache import cache_dir
    from memplan.catalog.resolve import resolve_model
    from memplan.catalog.spec import spec_from_config
    from memplan.files import parse_json
    from memplan.recommend.writers import _write_file

    config = parse_json(text, "config.json")
    spec_from_config(config, "config.json")  # a config memplan cannot read is refused here, with the reason
    path = cache_dir() / "uploads" / hashlib.sha256(text.encode()).hexdigest()[:16] / "config.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(path, text)
    except OSError as err:
        raise UserError(f"cannot keep the uploaded config.json in {path.parent}: {err.strerror}") from None
    resolve_model(str(path))
    return path


#: One request computes at a time (the estimate is arithmetic: tens of milliseconds; a recommendation about a
#: second), so memplan's module-level caches are never shared between threads.
_LOCK = threading.Lock()


def _index():
    from flask import redirect, request

    if not request.args:
        return redirect("/" + render.query(view.LANDING))
    pairs = list(request.args.items(multi=True))
    try:
        values, errors = _values(pairs), {}
    except form.InputErrors as err:  # the form again, with what can be shown of what was sent
        values, errors = {k: v for k, v in pairs if k in form.fields()}, err.by_field()
        return render.page(values, errors), 400
    v = answer = None
    with _LOCK:
        try:
            v = view.view(values)
        except form.InputErrors as err:
            errors = err.by_field()
        try:
            answer = view.recommend(values)
        except form.InputErrors as err:
            errors = {**err.by_field(), **errors}
    return render.page(values, errors, v, answer), 400 if errors else 200


def _api_estimate():
    from flask import jsonify, request

    values = _api_values(request)
    with _LOCK:
        out, _ = view.estimate_json(values)
    return jsonify(out)


def _api_recommend():
    from flask import jsonify, request

    values = _api_values(request)
    with _LOCK:
        answer = view.recommend(values, always=True, files=False)
    return jsonify(answer.json)


def _api_upload():
    from flask import jsonify, request

    try:
        text = request.get_data(cache=False).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"config.json is not UTF-8 text (byte {err.start})") from None
    with _LOCK:
        return jsonify({"model": str(store_upload(text))})


def _download():
    from flask import Response, request

    values = _values(request.args.items(multi=True))
    with _LOCK:
        answer = view.recommend(values, always=True)
    if not answer.fits:
        raise UserError("no plan fits, so there are no files to download: "
                        + "; ".join(answer.rec.suggestions or ["see the page for what would fit instead"]))
    return Response(view.zip_files(answer.files), mimetype="application/zip",
                    headers={"Content-Disposition": f"attachment; filename={view.FILES_DIR}.zip"})


def _bad_input(err: UserError):
    from flask import jsonify

    return jsonify(_problem(err)), 400


def _http_error(err):
    from flask import jsonify

    return jsonify({"error": f"{err.code} {err.name}: {err.description}", "errors": []}), err.code


def _internal(err: Exception):
    """A bug, never bad input: said in one line (the traceback on stderr), and the server goes on."""
    import traceback

    from flask import jsonify

    traceback.print_exception(err, file=sys.stderr)
    return jsonify({"error": f"internal error: {type(err).__name__}: {err}", "errors": []}), 500


def create_app():
    """The Flask app: the routes of the module docstring."""
    from flask import Flask
    from werkzeug.exceptions import HTTPException

    app = Flask("memplan.serve", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.json.sort_keys = False  # the objects in the order --json prints them
    app.add_url_rule("/", view_func=_index)
    app.add_url_rule("/api/estimate", view_func=_api_estimate, methods=["GET", "POST"])
    app.add_url_rule("/api/recommend", view_func=_api_recommend, methods=["GET", "POST"])
    app.add_url_rule("/api/upload", view_func=_api_upload, methods=["POST"])
    app.add_url_rule("/download/recommended.zip", view_func=_download)
    app.register_error_handler(UserError, _bad_input)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _internal)
    return app


def make_server(host: str, port: int):
    """Werkzeug's threaded HTTP server for the app on host:port (0: a free port); UserError when it cannot
    listen there."""
    from werkzeug.serving import make_server as werkzeug_server

    try:
        return werkzeug_server(host, port, create_app(), threaded=True)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err} (give another --port, or 0 for "
                        "a free one)") from None
    except (ValueError, UnicodeError) as err:  # a host that is no address
        raise UserError(f"--host {host}: not an address to listen on ({err})") from None


def serve(host: str, port: int) -> None:
    """`memplan serve`: print the address, answer until Ctrl-C."""
    import click

    server = make_server(host, port)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"memplan serve: http://{shown}:{server.server_port}/ (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("memplan serve: stopped")
    finally:
        server.server_close()
