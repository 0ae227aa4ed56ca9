"""`berth kb add|list|rm`: the knowledge base of a running server, from the shell (its HTTP API).

    berth kb add FILE... [--url URL] [--token T]    upload, wait for indexing, print each file's outcome
    berth kb list [--url URL] [--token T]
    berth kb rm NAME [--url URL] [--token T]
The URL defaults to $BERTH_URL or http://127.0.0.1:8000, the token to $BERTH_TOKEN. Exit 0 on success,
1 when a file failed or the server refused, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("kb", help="add, list or remove knowledge-base documents of a running server")
    p.add_argument("action", choices=("add", "list", "rm"))
    p.add_argument("items", nargs="*", help="files to add, or the document name to remove")
    p.add_argument("--url", default=os.environ.get("BERTH_URL", "http://127.0.0.1:8000"))
    p.add_argument("--token", default=os.environ.get("BERTH_TOKEN"))
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for indexing")


def main(args) -> int:
    try:
        if args.action == "list":
            return _list(args)
        if not args.items:
            print(f"berth kb {args.action}: name at least one {'file' if args.action == 'add' else 'document'}",
                  file=sys.stderr)
            return 2
        return _add(args) if args.action == "add" else _rm(args)
    except urllib.error.HTTPError as err:
        print(f"berth kb: {err.code}: {_message(err)}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as err:
        print(f"berth kb: cannot reach {args.url}: {getattr(err, 'reason', err)}", file=sys.stderr)
        return 1


def _request(args, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    if content_type:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(args.url.rstrip("/") + path, data=body, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read() or b"{}")


def _message(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return err.reason


def _add(args) -> int:
    boundary = uuid.uuid4().hex
    body = bytearray()
    for item in args.items:
        path = Path(item)
        if not path.is_file():
            print(f"berth kb add: no such file: {item}", file=sys.stderr)
            return 2
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
                 f"filename=\"{path.name}\"\r\nContent-Type: {kind}\r\n\r\n").encode() + path.read_bytes() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    task = _request(args, "POST", "/api/v1/upload_data", bytes(body), f"multipart/form-data; boundary={boundary}")
    deadline = time.monotonic() + args.timeout
    while True:
        state = _request(args, "GET", "/api/v1/get_upload_state?task_id=" + urllib.parse.quote(task["task_id"]))
        if state["status"] in ("completed", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for name in state["documents"]:
        print(f"added {name}")
    for error in state["errors"]:
        print(f"failed {error['file']}: {error['error']}", file=sys.stderr)
    if state["status"] not in ("completed", "failed"):
        print(f"berth kb add: still indexing after {args.timeout:g} s (task {task['task_id']})", file=sys.stderr)
        return 1
    return 1 if state["errors"] else 0


def _list(args) -> int:
    body = _request(args, "GET", "/api/v1/documents")
    for doc in body["documents"]:
        print(f"{doc['name']}\t{doc['num_chunks']} chunks\t{doc['num_bytes']} bytes")
    print(f"{len(body['documents'])} documents, {body['num_chunks']} chunks")
    return 0


def _rm(args) -> int:
    for name in args.items:
        _request(args, "DELETE", "/api/v1/documents/" + urllib.parse.quote(name, safe=""))
        print(f"removed {name}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="berth")
    add_parser(parser.add_subparsers(dest="command", required=True))
    sys.exit(main(parser.parse_args()))
