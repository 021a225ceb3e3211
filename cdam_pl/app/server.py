"""The web demo's HTTP side: one plain page and a JSON API over `DemoEngine`, served on 127.0.0.1 only.

    python -m cdam_pl.app runs/demo/version_0/checkpoints/last.ckpt --port 8000     # then open the printed URL

Why the standard library (`http.server`) and one plain page rather than Gradio or FastAPI: the demo must work with
no network at all and never send a request off the machine. Gradio pulls in a large dependency tree and by default
loads fonts and scripts from CDNs and reports analytics; FastAPI would add three packages for what is a handful of
routes. Here the server is `ThreadingHTTPServer` bound to 127.0.0.1, the page is one HTML file, one script and one
style sheet shipped in `cdam_pl/app/static/` (system fonts, no external URL anywhere), and nothing new to install.

User mistakes come back as a JSON message shown in the page, with the status the error carries (`RequestError`:
404 for `NotFoundError`, 400 otherwise; 400 for any other `CdamError`); an unexpected error answers 500 with a
message and the server keeps running.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import traceback
import urllib.parse
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

from cdam_pl.app.engine import MAX_CONCEPT_IMAGES, DemoEngine, size_text
from cdam_pl.app.examples import demo_examples
from cdam_pl.checkpoint import load_checkpoint
from cdam_pl.cli import run_cli
from cdam_pl.errors import CdamError, RequestError

__all__ = ["DemoServer", "make_server", "serve", "main"]

STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}


class HttpError(RequestError):
    """An error of the request itself (wrong host, no or bad length, too large, not multipart, unknown page), with
    its HTTP status; the message is shown in the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)


def status_of(error: CdamError) -> int:
    """The HTTP status a user error is answered with: the one a `RequestError` carries, 400 for the others."""
    return error.status if isinstance(error, RequestError) else RequestError.status


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """multipart/form-data -> (text fields, [(filename, bytes)] of the file fields), with the standard library."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise HttpError(400, "expected a multipart/form-data upload")
    msg = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n" + body)
    if not msg.is_multipart():
        raise HttpError(400, "could not read the multipart upload")
    fields, files = {}, []
    for part in msg.iter_parts():
        field_name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        payload = part.get_payload(decode=True) or b""
        if filename is not None:
            files.append((filename, payload))
        elif field_name:
            fields[str(field_name)] = payload.decode("utf-8", "replace")
    return fields, files


class DemoServer(ThreadingHTTPServer):
    """The demo's HTTP server, bound to 127.0.0.1; `url` is where the page is."""

    daemon_threads = True

    def __init__(self, engine: DemoEngine, port: int = 0, quiet: bool = False):
        self.engine = engine
        self.quiet = quiet
        super().__init__(("127.0.0.1", int(port)), _Handler)
        self.port = int(self.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/"
        self._thread: threading.Thread | None = None

    def start(self) -> "DemoServer":
        """Serve from a background thread (for tests and embedding); `close()` stops it."""
        self._thread = threading.Thread(target=self.serve_forever, name="cdam-demo", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: DemoServer
    server_version = "cdam-pl-demo"
    DRAIN_LIMIT = 2**30  # bodies above the limit are read and dropped up to this size (so the browser sees the message)

    # --- plumbing ------------------------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        try:
            self._check_host()
            route = ROUTES.get((method, url.path))
            if route is None and method == "GET" and url.path.startswith("/static/"):
                route = _Handler._static
            if route is None:
                raise HttpError(404, f"no page {url.path!r} here; open / for the demo")
            route(self, query, url.path)
        except CdamError as e:
            self._json({"error": str(e)}, status_of(e))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away
        except Exception as e:  # a bug, not the user's fault: answer, log, keep serving
            traceback.print_exc(file=sys.stderr)
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            try:
                self._json({"error": f"internal error ({msg}); the server keeps running, see its log"}, 500)
            except OSError:
                pass

    def _check_host(self) -> None:
        """Only answer requests addressed to this machine (guards against DNS rebinding from other sites)."""
        host = (self.headers.get("Host") or "").strip().lower()
        if host and host not in (f"127.0.0.1:{self.server.port}", f"localhost:{self.server.port}"):
            raise HttpError(403, f"requests must address 127.0.0.1:{self.server.port}")

    def _send(self, body: bytes, content_type: str, status: int = 200, filename: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # The page may only talk to this server: no external script, style, font, image or connection.
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data: blob:; "
                                                    "object-src 'none'; base-uri 'none'; form-action 'self'")
        if filename:
            self.send_header("Content-Disposition", f"attachment; filename=\"{filename}\"")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(json.dumps(obj).encode(), "application/json", status)

    def _body(self, limit: int) -> bytes:
        """The request body, at most `limit` bytes; bigger ones are drained and refused with a message."""
        length = self.headers.get("Content-Length")
        if length is None:
            raise HttpError(411, "the upload had no Content-Length; send the file as a plain request body")
        try:
            n = int(length)
        except ValueError:
            raise HttpError(400, f"bad Content-Length {length!r}") from None
        if n > limit:
            if n <= self.DRAIN_LIMIT:
                left = n
                while left > 0:
                    chunk = self.rfile.read(min(left, 2**20))
                    if not chunk:
                        break
                    left -= len(chunk)
            else:
                self.close_connection = True
            raise HttpError(413, f"the upload is {size_text(n)}, more than the limit of {size_text(limit)}; "
                                 "choose a smaller image")
        data = self.rfile.read(n) if n else b""
        if len(data) != n:
            raise HttpError(400, "the upload was cut short; try again")
        return data

    # --- routes --------------------------------------------------------------------------------------------------
    def _index(self, query, path) -> None:
        self._static(query, "/static/index.html")

    def _static(self, query, path) -> None:
        name = path[len("/static/"):]
        if name not in STATIC_FILES:
            raise HttpError(404, f"no file {name!r}")
        body = (resources.files("cdam_pl.app") / "static" / name).read_bytes()
        self._send(body, f"{STATIC_FILES[name]}; charset=utf-8")

    def _info(self, query, path) -> None:
        self._json(self.server.engine.info())

    def _upload(self, query, path) -> None:
        data = self._body(self.server.engine.max_upload_bytes)
        name = (query.get("name") or "upload").strip()[:200] or "upload"
        self._json(self.server.engine.add_upload(data, name))

    def _example(self, query, path) -> None:
        self._json(self.server.engine.add_example(query.get("id", "")))

    def _example_png(self, query, path) -> None:
        self._send(self.server.engine.example_thumbnail(query.get("id", "")), "image/png")

    def _concept(self, query, path) -> None:
        engine = self.server.engine
        body = self._body(engine.max_upload_bytes * MAX_CONCEPT_IMAGES)
        fields, files = _parse_multipart(self.headers.get("Content-Type", ""), body)
        files = [(name, data) for name, data in files if name or data]  # an empty file field: nothing chosen
        self._json(engine.add_concept(fields.get("name", ""), files))

    def _explain(self, query, path) -> None:
        self._json(self.server.engine.explain(*self._target(query)))

    def _input_png(self, query, path) -> None:
        self._send(self.server.engine.input_png(query.get("image", "")), "image/png")

    def _overlay_png(self, query, path) -> None:
        self._send(self.server.engine.overlay_png(*self._target(query)), "image/png")

    def _attention_png(self, query, path) -> None:
        self._send(self.server.engine.attention_png(query.get("image", "")), "image/png")

    def _panel_png(self, query, path) -> None:
        engine, args = self.server.engine, self._target(query)
        self._send(engine.panel_png(*args), "image/png", filename=engine.download_name(*args, "_panel.png"))

    def _map_npz(self, query, path) -> None:
        engine, args = self.server.engine, self._target(query)
        self._send(engine.raw_npz(*args), "application/octet-stream", filename=engine.download_name(*args, "_map.npz"))

    @staticmethod
    def _target(query: dict[str, str]) -> tuple[str, str, str]:
        return query.get("image", ""), query.get("target", ""), query.get("variant", "vanilla")


ROUTES: dict[tuple[str, str], Callable[[_Handler, dict, str], None]] = {
    ("GET", "/"): _Handler._index,
    ("GET", "/index.html"): _Handler._index,
    ("GET", "/api/info"): _Handler._info,
    ("GET", "/api/example.png"): _Handler._example_png,
    ("POST", "/api/example"): _Handler._example,
    ("POST", "/api/upload"): _Handler._upload,
    ("POST", "/api/concept"): _Handler._concept,
    ("GET", "/api/explain"): _Handler._explain,
    ("GET", "/api/input.png"): _Handler._input_png,
    ("GET", "/api/overlay.png"): _Handler._overlay_png,
    ("GET", "/api/attention.png"): _Handler._attention_png,
    ("GET", "/api/panel.png"): _Handler._panel_png,
    ("GET", "/api/map.npz"): _Handler._map_npz,
}


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------


def make_server(checkpoint: str | Path, port: int = 0, *, weights: str | None = None, device: str = "cpu",
                examples: bool = True, quiet: bool = False, **engine_options: Any) -> DemoServer:
    """Load the checkpoint and bind the demo to 127.0.0.1:port (0 = any free port); not yet serving."""
    model = load_checkpoint(checkpoint, weights=weights, device=device)
    found = demo_examples(model.config, model.backbone) if examples else []
    engine = DemoEngine(model, examples=found, device=device, **engine_options)
    try:
        return DemoServer(engine, port, quiet=quiet)
    except OSError as e:
        raise CdamError(f"cannot listen on 127.0.0.1:{port} ({e.strerror or e}); "
                        "pass --port with another number (0 picks a free one)") from None


def serve(checkpoint: str | Path, port: int = 8000, *, weights: str | None = None, device: str = "cpu",
          examples: bool = True, quiet: bool = False, **engine_options: Any) -> int:
    """Run the demo on http://127.0.0.1:port/ until Ctrl-C. Raises CdamError for a bad checkpoint or a busy port."""
    server = make_server(checkpoint, port, weights=weights, device=device, examples=examples, quiet=quiet,
                         **engine_options)
    print(f"cdam-pl demo: {server.url}  ({len(server.engine.classes)} classes; Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cdam_pl.app", description="Local web demo: explain a trained "
                                "head's decisions with CDAM in the browser (served on 127.0.0.1 only).")
    p.add_argument("checkpoint",
                   help="a checkpoint written by train.py (e.g. runs/NAME/version_0/checkpoints/last.ckpt)")
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000; 0 picks a free one)")
    p.add_argument("--weights", default=None, help="where the backbone weights are, if they moved since training")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-examples", action="store_true", help="do not offer the bundled example images")
    p.add_argument("--quiet", action="store_true", help="no request log")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be between 0 and 65535, got {args.port}")
    return run_cli(lambda: serve(args.checkpoint, args.port, weights=args.weights, device=args.device,
                                 examples=not args.no_examples, quiet=args.quiet))
