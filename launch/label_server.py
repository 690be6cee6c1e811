"""The labelling page: people rank a prompt's K answers, or give one answer a thumb, from a queue in a SQLite file
(rlhf_ray/label_store.py).

    rlhf-ray label-server serve --db labels.sqlite [--host 127.0.0.1] [--port 8765]
    rlhf-ray label-server add-labeler --db labels.sqlite NAME [--lead]   prints NAME's token (once; a hash is kept)
    rlhf-ray label-server add --db labels.sqlite --file rows.jsonl [--kind rank|thumbs] [--batch B] [--wanted N]
    rlhf-ray label-server export --db labels.sqlite --kind rankings|pairs|thumbs [--batch B] [--out F]
    rlhf-ray label-server report --db labels.sqlite [--batch B]

A labeler opens http://127.0.0.1:8765/#token=TOKEN (the token rides in the fragment, which the browser never sends:
it stays out of server and proxy logs; the page sends it as a bearer header). The team lead's page is /lead.html
with a lead's token: per-labeler counts, agreement, reliability and position bias, and the exports. The pipeline
fills the same file itself (pipeline.labels human) and waits for it.

FastAPI (no front-end build: the page is three static files in launch/label_page/, plain JavaScript). Answers are
model output, so the page only ever sets them as text (textContent), and the Content-Security-Policy forbids inline
script besides: an answer holding <script> shows as characters. Bound to 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel

from rlhf_ray.label_store import LabelError, LabelStore

PAGE = Path(__file__).parent / "label_page"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class Label(BaseModel):
    task: int
    tiers: Optional[list[list[int]]] = None    # rank: shown positions, best tier first
    thumb: Optional[bool] = None               # thumbs: true up, false down
    reason: str = ""
    skip: bool = False
    seconds: Optional[float] = None            # how long the task was on screen


class Tasks(BaseModel):
    batch: str
    kind: str = "rank"
    wanted: int = 1
    rows: list[dict]


def make_app(store: LabelStore) -> FastAPI:
    app = FastAPI(title="rlhf-ray labelling", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(LabelError)
    async def refused(request: Request, exc: LabelError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    def labeler(authorization: Optional[str] = Header(default=None)):
        token = authorization.removeprefix("Bearer ").strip() if authorization else None
        who = store.who(token)
        if who is None:
            raise HTTPException(401, "no valid token: open the link your team lead gave you")
        return who

    def lead(who=Depends(labeler)):
        if not who.lead:
            raise HTTPException(403, "this page is for the team lead")
        return who

    for name in ("index.html", "lead.html", "app.js", "lead.js", "style.css"):
        def page(name=name):
            return FileResponse(PAGE / name)
        app.get("/" if name == "index.html" else f"/{name}", include_in_schema=False)(page)

    @app.get("/api/me")
    def me(who=Depends(labeler)):
        return {"name": who.name, "lead": who.lead}

    @app.get("/api/next")
    def next_task(batch: Optional[str] = None, who=Depends(labeler)):
        return {"task": store.next_task(who.name, batch), "progress": store.progress(who.name, batch)}

    @app.post("/api/label")
    def label(body: Label, who=Depends(labeler)):
        stored = store.submit(who.name, body.task, body.tiers, body.thumb, body.reason, body.skip, body.seconds)
        return {"stored": stored, "duplicate": not stored}

    @app.get("/api/report")
    def report(batch: Optional[str] = None, who=Depends(lead)):
        return store.report(batch)

    @app.get("/api/export/{kind}")
    def export(kind: str, batch: Optional[str] = None, who=Depends(lead)):
        rows = store.export(kind, batch)
        return PlainTextResponse("".join(json.dumps(r) + "\n" for r in rows), media_type="application/x-ndjson")

    @app.post("/api/tasks")
    def add(body: Tasks, who=Depends(lead)):
        return {"tasks": store.add_tasks(body.batch, body.rows, body.kind, body.wanted)}

    return app


def warn_if_public(host: str) -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"label-server: listening on {host}, beyond this machine: put it behind TLS (tokens travel in "
              "headers)", file=sys.stderr)


def serve(db: str, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Until interrupted (Ctrl-C, SIGTERM)."""
    import signal
    page = start_page(LabelStore(db), f"{host}:{port}")
    signal.signal(signal.SIGTERM, lambda *_: setattr(page.server, "should_exit", True))
    try:
        while page.thread.is_alive():
            page.thread.join(0.5)
    except KeyboardInterrupt:
        page.stop()


class Page:
    """The labelling page served from a thread of this process (the pipeline's, while it waits for people)."""

    def __init__(self, store: LabelStore, host: str, port: int):
        import threading

        import uvicorn
        warn_if_public(host)
        self.server = uvicorn.Server(uvicorn.Config(make_app(store), host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="label-page", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise LabelError(f"the labelling page could not listen on {host}:{port} (in use? "
                                 "pipeline.label_page \"\" serves none)")
            self.thread.join(0.05)
        bound = self.server.servers[0].sockets[0].getsockname()
        self.url = f"http://{bound[0]}:{bound[1]}/"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_page(store: LabelStore, host_port: str) -> Page:
    """Serve the page on host_port ("127.0.0.1:8765"; port 0: any free one) and say where, and how to let people in."""
    host, _, port = host_port.rpartition(":")
    page = Page(store, host, int(port))
    print(f"labelling page: {page.url}  (a person's link: {page.url}#token=TOKEN, a token from `rlhf-ray "
          f"label-server add-labeler --db {store.path} NAME`; the lead's page: {page.url}lead.html)", flush=True)
    return page


def read_jsonl(path: str) -> list[dict]:
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise LabelError(f"{path}: {e.strerror}") from None
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LabelError(f"{path}:{i}: not JSON ({e.msg})") from None
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="rlhf-ray label-server", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("serve", "add-labeler", "add", "export", "report"):
        p = sub.add_parser(name)
        p.add_argument("--db", required=True)
        p.add_argument("--batch", default=None if name in ("export", "report") else "default")
        if name == "serve":
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--port", type=int, default=8765)
        if name == "add-labeler":
            p.add_argument("name")
            p.add_argument("--lead", action="store_true")
        if name == "add":
            p.add_argument("--file", required=True, help="JSONL rows {prompt, responses: [...]}")
            p.add_argument("--kind", default="rank", choices=["rank", "thumbs"])
            p.add_argument("--wanted", type=int, default=1, help="labels wanted per task (distinct labelers)")
        if name == "export":
            p.add_argument("--kind", required=True, choices=["rankings", "pairs", "thumbs"])
            p.add_argument("--out", default="-")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "serve":
            serve(args.db, args.host, args.port)
            return 0
        store = LabelStore(args.db)
        if args.cmd == "add-labeler":
            print(store.add_labeler(args.name, args.lead))
        elif args.cmd == "add":
            ids = store.add_tasks(args.batch, read_jsonl(args.file), args.kind, args.wanted)
            print(f"queued {len(ids)} {args.kind} tasks in batch {args.batch!r}")
        elif args.cmd == "export":
            text = "".join(json.dumps(r) + "\n" for r in store.export(args.kind, args.batch))
            if args.out == "-":
                sys.stdout.write(text)
            else:                                       # whole or not at all
                tmp = Path(f"{args.out}.tmp")
                tmp.write_text(text)
                os.replace(tmp, args.out)
        else:
            print(json.dumps(store.report(args.batch), indent=1))
    except LabelError as e:
        print(f"label-server: {e}", file=sys.stderr)
        return 2
    return 0
