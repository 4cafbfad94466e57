"""A local labelling page for preference pairs: people choose the better of two sampled responses.

    python -m pipeline.label [--annotator ana] [--port 8765]
    # then open http://127.0.0.1:8765 ; labels go to data/labels/human.jsonl
    python -m pipeline.run stage=collect judge=human      # or: dvc exp run -S judge=human

Pairs come from the ``collect`` stage's samples (``data/collect/samples.jsonl``): for each prompt, up to
``--pairs-per-prompt`` pairs of distinct finished responses, chosen by a seeded generator. Each pair is
shown in a random order (seeded by the pair id, and recorded), so a labeller's taste for the left side
does not become the data's. The labeller picks A, B, tie or both bad (keys ``1``-``4`` or ``a`` ``b``
``t`` ``x``), optionally with a short reason; the annotator name is asked once (kept in the browser).

Every choice is appended to the label file at once, as one JSON line in the ``human`` judge's format
(:func:`pipeline.judges.read_labels`) plus ``pair_id``, ``order`` and ``time``, with one ``write`` on a file
opened for appending, then flushed and synced: killing the server or closing the browser loses nothing,
and a restart resumes at the annotator's first unlabelled pair. Several annotators can label the same
pairs; ``collect`` with ``judge=human`` reports their agreement, and with the verifier where one exists,
and resolves conflicts by ``judge.conflict``.

The server is the standard library's ``ThreadingHTTPServer`` bound to 127.0.0.1 (no dependency; the page
is one inline HTML document with no external assets, so it works offline). API: ``GET /api/state?annotator=``
(progress and the next pair), ``POST /api/label`` (``{"pair_id", "choice", "annotator", "reason"}``); a choice
that is not one of the four, an unknown pair id or a missing annotator gets a 400 with the reason and
changes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

CHOICES = ("a", "b", "tie", "both_bad")


@dataclass(frozen=True)
class Pair:
    """Two responses to one prompt, in the order they are shown (``a`` left, ``b`` right)."""

    pair_id: str
    prompt_id: str
    prompt: str
    a: str
    b: str
    order: str  # "ab": shown as sampled; "ba": swapped


def pair_id(prompt_id: str, first: str, second: str) -> str:
    """Stable id of an unordered pair of responses to a prompt."""
    low, high = sorted((first, second))
    return hashlib.sha256(json.dumps([prompt_id, low, high]).encode()).hexdigest()[:16]


def load_pairs(samples_path: str | Path, per_prompt: int = 1, seed: int = 0) -> list[Pair]:
    """Pairs to label from ``collect``'s ``samples.jsonl``: distinct finished responses, ``per_prompt`` per
    prompt at most, each shown in a seeded random order."""
    from pipeline.chat import json_objects

    pairs = []
    for where, row in json_objects(samples_path, "samples", "run the collect stage first"):
        for field in ("prompt_id", "prompt", "samples"):
            if field not in row:
                raise ValueError(f"{where}: field '{field}' is missing")
        texts = sorted({s["text"] for s in row["samples"] if s.get("finished", True) and s["text"].strip()})
        candidates = [(x, y) for i, x in enumerate(texts) for y in texts[i + 1:]]
        rng = random.Random(f"{seed}:{row['prompt_id']}")
        for first, second in rng.sample(candidates, min(per_prompt, len(candidates))):
            pid = pair_id(row["prompt_id"], first, second)
            swapped = random.Random(f"{seed}:{pid}").random() < 0.5
            a, b = (second, first) if swapped else (first, second)
            pairs.append(Pair(pid, row["prompt_id"], row["prompt"], a, b, "ba" if swapped else "ab"))
    return pairs


class LabelStore:
    """The label file: appended one line per choice, read back to know who labelled what."""

    def __init__(self, path: str | Path, pairs: list[Pair]):
        self.path = Path(path)
        self.pairs = pairs
        self.by_id = {p.pair_id: p for p in pairs}
        self.lock = threading.Lock()
        self.done: dict[str, set[str]] = {}  # annotator -> labelled pair ids
        if self.path.exists():
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except (json.JSONDecodeError, RecursionError):
                        raise ValueError(f"{self.path}:{number}: not valid JSON; fix or remove the line") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{self.path}:{number}: a label must be a JSON object, got "
                                         f"{type(row).__name__}; fix or remove the line")
                    if "pair_id" in row and "annotator" in row:
                        self.done.setdefault(row["annotator"], set()).add(row["pair_id"])

    def state(self, annotator: str) -> dict:
        """Progress of ``annotator`` and their first unlabelled pair (None when done)."""
        done = self.done.get(annotator, set())
        labelled = sum(p.pair_id in done for p in self.pairs)
        following = next((p for p in self.pairs if p.pair_id not in done), None)
        pair = None if following is None else {"pair_id": following.pair_id, "prompt": following.prompt,
                                                "a": following.a, "b": following.b}
        return {"annotator": annotator, "done": labelled, "total": len(self.pairs), "pair": pair}

    def add(self, pair_id_: str, choice: str, annotator: str, reason: str = "") -> dict:
        """Validate and append one label; raise ValueError (nothing written) on bad input."""
        if not isinstance(annotator, str) or not annotator.strip():
            raise ValueError("annotator: a name is needed")
        if choice not in CHOICES:
            raise ValueError(f"choice: {choice!r} is not one of {list(CHOICES)}")
        pair = self.by_id.get(pair_id_) if isinstance(pair_id_, str) else None
        if pair is None:
            raise ValueError(f"pair_id: {pair_id_!r} is not a pair of this session")
        if not isinstance(reason, str) or len(reason) > 500:
            raise ValueError("reason: at most 500 characters of text")
        row = {"prompt_id": pair.prompt_id, "pair_id": pair.pair_id, "response_a": pair.a, "response_b": pair.b,
               "choice": choice, "annotator": annotator.strip(), "order": pair.order,
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if reason.strip():
            row["reason"] = reason.strip()
        line = (json.dumps(row, sort_keys=True) + "\n").encode()
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)  # one write of one line to an O_APPEND file: never interleaved, never half
                os.fsync(fd)
            finally:
                os.close(fd)
            self.done.setdefault(row["annotator"], set()).add(pair.pair_id)
        return self.state(row["annotator"])


MAX_BODY = 100_000  # bytes of one POST: a label with a 500-character reason is well under 2 KB


def make_handler(store: LabelStore):
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # seconds a connection may stall (a client that announces more body than it sends)

        def log_message(self, fmt, *args):  # quiet: one line per request is noise here
            pass

        def _foreign(self) -> str | None:
            """Why this request is not from the page this server serves, or None. Host must name this server
            (a page of another site reaching 127.0.0.1 through DNS rebinding sends its own name); Origin, when a
            browser sends one, must be this server's own."""
            port = self.server.server_address[1]
            bound = self.server.server_address[0]
            names = {f"127.0.0.1:{port}", f"localhost:{port}", f"{bound}:{port}", f"[::1]:{port}"}
            host = self.headers.get("Host", "")
            if host not in names:
                return f"Host {host!r} is not this server"
            origin = self.headers.get("Origin")
            if origin is not None and origin.removeprefix("http://") not in names:
                return f"Origin {origin!r} is not this server"
            return None

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def do_GET(self):
            foreign = self._foreign()
            if foreign:
                return self._json(403, {"error": foreign})
            url = urlparse(self.path)
            if url.path == "/":
                return self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            if url.path == "/api/state":
                annotator = parse_qs(url.query).get("annotator", [""])[0]
                if not annotator.strip():
                    return self._json(400, {"error": "annotator: a name is needed"})
                return self._json(200, store.state(annotator.strip()))
            return self._json(404, {"error": f"no such page: {url.path}"})

        def do_POST(self):
            foreign = self._foreign()
            if foreign:  # a cross-site form or fetch: refused before anything is read
                self.close_connection = True
                return self._json(403, {"error": foreign})
            if urlparse(self.path).path != "/api/label":
                self.close_connection = True
                return self._json(404, {"error": "no such endpoint"})
            if self.headers.get_content_type() != "application/json":  # no cross-site "simple" POST
                self.close_connection = True
                return self._json(415, {"error": "Content-Type: application/json is needed"})
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.close_connection = True
                return self._json(411, {"error": "Content-Length: a byte count is needed"})
            if not 0 < length <= MAX_BODY:
                self.close_connection = True
                return self._json(413, {"error": f"Content-Length: {length} is not within 1..{MAX_BODY} bytes"})
            try:
                body = json.loads(self.rfile.read(length))
                if not isinstance(body, dict):
                    raise ValueError("body: a JSON object is needed")
                state = store.add(body.get("pair_id"), body.get("choice"), body.get("annotator", ""),
                                  body.get("reason", "") or "")
            except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                message = "body: JSON nested too deeply" if isinstance(err, RecursionError) else str(err)
                return self._json(400, {"error": message})
            except TimeoutError:
                self.close_connection = True
                return None
            return self._json(200, state)

    return Handler


class LabelServer(ThreadingHTTPServer):
    """One thread per request; a listen backlog for bursts (the standard library's 5 resets connections when
    a page and a script post at once); handler threads never keep the process alive."""

    request_queue_size = 128
    daemon_threads = True


def serve(samples: str | Path, labels: str | Path, host: str = "127.0.0.1", port: int = 8765, per_prompt: int = 1,
          seed: int = 0) -> ThreadingHTTPServer:
    """A ready server (call ``serve_forever``); port 0 picks a free one (``server.server_address``)."""
    store = LabelStore(labels, load_pairs(samples, per_prompt, seed))
    server = LabelServer((host, port), make_handler(store))
    server.store = store
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the preference labelling page on 127.0.0.1.")
    parser.add_argument("--samples", default="data/collect/samples.jsonl", help="collect's samples")
    parser.add_argument("--labels", default="data/labels/human.jsonl", help="label file to append to (judge.labels_file)")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1", help="keep 127.0.0.1 unless you know who else can reach it")
    parser.add_argument("--pairs-per-prompt", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="which pairs, and their order on screen")
    args = parser.parse_args()
    try:
        server = serve(args.samples, args.labels, args.host, args.port, args.pairs_per_prompt, args.seed)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    host, port = server.server_address[:2]
    print(f"labelling {len(server.store.pairs)} pairs at http://{host}:{port}/ -> {args.labels}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>posttrain: label preference pairs</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0; background: #f6f6f4; color: #222; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd; padding: 10px 24px;
         display: flex; gap: 24px; align-items: center; }
#progress { font-weight: 600; }
main { max-width: 1100px; margin: 20px auto; padding: 0 24px; }
#prompt { background: #fff; border: 1px solid #ddd; padding: 14px; border-radius: 6px; margin-bottom: 16px;
          white-space: pre-wrap; }
.pair { display: flex; gap: 16px; }
.response { flex: 1; background: #fff; border: 2px solid #ddd; border-radius: 6px; padding: 14px; min-height: 80px;
            white-space: pre-wrap; font-family: ui-monospace, monospace; }
.response h3 { margin: 0 0 8px; font-family: system-ui, sans-serif; font-size: 14px; color: #666; }
.buttons { margin: 16px 0; display: flex; gap: 10px; flex-wrap: wrap; }
button { font-size: 15px; padding: 8px 14px; border-radius: 6px; border: 1px solid #aaa; background: #fff; cursor: pointer; }
kbd { border: 1px solid #aaa; border-radius: 3px; padding: 0 4px; font-size: 12px; background: #eee; }
#reason { width: 60%; padding: 6px; }
#error { color: #b00020; min-height: 1.2em; }
#done { display: none; font-size: 18px; }
#who { display: none; }
</style></head>
<body>
<header><span>posttrain labelling</span><span id="progress">– / –</span><span id="annotator"></span>
<a href="#" id="change">change name</a></header>
<main>
<form id="who"><p>Your name (recorded with every label):</p><input id="name" autocomplete="off">
<button type="submit">start</button></form>
<section id="work">
<div id="prompt"></div>
<div class="pair">
  <div class="response" id="a"><h3>A</h3><div id="a-text"></div></div>
  <div class="response" id="b"><h3>B</h3><div id="b-text"></div></div>
</div>
<p><input id="reason" placeholder="optional reason (Esc leaves this box, then use the keys)" maxlength="500"></p>
<div class="buttons">
  <button data-choice="a"><kbd>1</kbd>/<kbd>a</kbd> A is better</button>
  <button data-choice="b"><kbd>2</kbd>/<kbd>b</kbd> B is better</button>
  <button data-choice="tie"><kbd>3</kbd>/<kbd>t</kbd> tie</button>
  <button data-choice="both_bad"><kbd>4</kbd>/<kbd>x</kbd> both bad</button>
</div>
<div id="error"></div>
</section>
<p id="done">Every pair is labelled. Thank you. Rerun the chain with <code>judge=human</code>.</p>
</main>
<script>
let state = null, busy = false;
const KEYS = {"1": "a", "a": "a", "2": "b", "b": "b", "3": "tie", "t": "tie", "4": "both_bad", "x": "both_bad"};
const $ = (id) => document.getElementById(id);
function name() { return localStorage.getItem("posttrain.annotator") || ""; }
function show(s) {
  state = s;
  $("progress").textContent = s.done + " / " + s.total + " labelled";
  $("annotator").textContent = "annotator: " + s.annotator;
  $("error").textContent = "";
  if (!s.pair) { $("work").style.display = "none"; $("done").style.display = "block"; return; }
  $("work").style.display = "block"; $("done").style.display = "none";
  $("prompt").textContent = s.pair.prompt;
  $("a-text").textContent = s.pair.a;
  $("b-text").textContent = s.pair.b;
  $("reason").value = "";
}
async function load() {
  if (!name()) { $("who").style.display = "block"; $("work").style.display = "none"; $("name").focus(); return; }
  $("who").style.display = "none";
  const r = await fetch("/api/state?annotator=" + encodeURIComponent(name()));
  const body = await r.json();
  if (!r.ok) { $("error").textContent = body.error; return; }
  show(body);
}
async function choose(choice) {
  if (busy || !state || !state.pair) return;
  busy = true;
  try {
    const r = await fetch("/api/label", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({pair_id: state.pair.pair_id, choice: choice, annotator: name(), reason: $("reason").value})});
    const body = await r.json();
    if (!r.ok) { $("error").textContent = body.error; return; }
    show(body);
  } catch (e) { $("error").textContent = "not saved: the server is not reachable (" + e + ")"; }
  finally { busy = false; }
}
document.addEventListener("keydown", (e) => {
  if (e.target === $("reason")) { if (e.key === "Escape") $("reason").blur(); return; }
  if (e.target === $("name") || e.ctrlKey || e.metaKey || e.altKey) return;
  const choice = KEYS[e.key.toLowerCase()];
  if (choice) { e.preventDefault(); choose(choice); }
});
document.querySelectorAll("button[data-choice]").forEach((b) => b.addEventListener("click", () => choose(b.dataset.choice)));
$("who").addEventListener("submit", (e) => {
  e.preventDefault();
  const n = $("name").value.trim();
  if (n) { localStorage.setItem("posttrain.annotator", n); load(); }
});
$("change").addEventListener("click", (e) => { e.preventDefault(); localStorage.removeItem("posttrain.annotator"); load(); });
load();
</script>
</body></html>
"""


if __name__ == "__main__":
    main()
