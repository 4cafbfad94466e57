"""A local labelling page for preference pairs: people choose the better of two sampled responses.

    python -m pipeline.label [--annotator ana] [--port 8765]
    # then open http://127.0.0.1:8765 ; labels go to data/labels/human.jsonl
    python -m pipeline.run stage=collect judge=human      # or: dvc exp run -S judge=human

Pairs come from the ``collect`` stage's samples (``data/collect/samples.jsonl``): for each prompt, up to
``--pairs-per-prompt`` pairs of distinct finished responses, chosen by a seeded generator. Each pair is
shown in a random order (seeded by the pair id, and recorded), so a labeller's taste for the left side
does not become the data's. The labeller picks A, B, tie or both bad (keys ``1``-``4`` or ``a`` ``b``
``t`` ``x``), optionally with a short reason; the annotator name is asked once (kept in the browser). ``s``
skips a pair (it comes back after the others), ``u`` undoes the annotator's last label, ``?`` lists the
keys. The guidelines (a Markdown file, ``judge.guidelines`` in ``conf/judge/human.yaml``) sit above the pair;
prompts and responses are rendered as Markdown by markdown-it with raw HTML disabled (shown as text) and
unsafe link schemes refused, so a response cannot inject markup or script into the page.

Every choice is appended to the label file at once, as one JSON line in the ``human`` judge's format
(:func:`pipeline.judges.read_labels`) plus ``pair_id``, ``order`` and ``time``, with one ``write`` on a file
opened for appending, then flushed and synced: killing the server or closing the browser loses nothing,
and a restart resumes at the annotator's first unlabelled pair. Each label carries a ``label_id``; undo
never rewrites the file, it appends a retraction ``{"retracts": <label_id>, "annotator", "pair_id", "time"}``
that :func:`pipeline.judges.read_labels` applies (the retracted label counts for nothing). Several annotators can label the same
pairs; ``collect`` with ``judge=human`` reports their agreement, and with the verifier where one exists,
and resolves conflicts by ``judge.conflict``.

The server is the standard library's ``ThreadingHTTPServer`` bound to 127.0.0.1 (no dependency; the page
is one inline HTML document with no external assets, so it works offline). API: ``GET /api/state?annotator=``
(progress and the next pair; ``&skip=<id>,<id>`` passes over skipped pairs while others remain),
``POST /api/label`` (``{"pair_id", "choice", "annotator", "reason"}``; the answer's ``recorded`` confirms what
was written and where), ``POST /api/undo`` (``{"annotator"}``: retracts their last label); a choice that is
not one of the four, an unknown pair id, a missing annotator or nothing to undo gets a 400 with the reason
and changes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import threading
import time
import uuid
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
    """The label file: appended one line per choice or retraction, read back to know who labelled what."""

    def __init__(self, path: str | Path, pairs: list[Pair]):
        self.path = Path(path)
        self.pairs = pairs
        self.by_id = {p.pair_id: p for p in pairs}
        self.lock = threading.Lock()
        self.lines = 0
        self.history: dict[str, list[tuple[str, str]]] = {}  # annotator -> (label_id, pair_id) not retracted, in order
        if self.path.exists():
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                self.lines = number
                if line.strip():
                    try:
                        row = json.loads(line)
                    except (json.JSONDecodeError, RecursionError):
                        raise ValueError(f"{self.path}:{number}: not valid JSON; fix or remove the line") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{self.path}:{number}: a label must be a JSON object, got "
                                         f"{type(row).__name__}; fix or remove the line")
                    self._apply(row)

    def _apply(self, row: dict) -> None:
        """Update who-labelled-what with one line of the file (a label or a retraction)."""
        annotator = row.get("annotator")
        if not isinstance(annotator, str):
            return
        history = self.history.setdefault(annotator, [])
        if "retracts" in row:
            history[:] = [entry for entry in history if entry[0] != row["retracts"]]
        elif "pair_id" in row:
            history.append((row.get("label_id") or f"line-{self.lines}", row["pair_id"]))

    def _done(self, annotator: str) -> set[str]:
        return {pair for _, pair in self.history.get(annotator, [])}

    def state(self, annotator: str, skip: tuple[str, ...] = ()) -> dict:
        """Progress of ``annotator`` and the pair to show: their first unlabelled pair that is not in ``skip``,
        or, when only skipped pairs remain, the first of those (None when every pair is labelled)."""
        done = self._done(annotator)
        open_pairs = [p for p in self.pairs if p.pair_id not in done]
        following = next((p for p in open_pairs if p.pair_id not in skip), open_pairs[0] if open_pairs else None)
        pair = None if following is None else {
            "pair_id": following.pair_id, "prompt": following.prompt, "a": following.a, "b": following.b,
            "html": {"prompt": markdown(following.prompt), "a": markdown(following.a), "b": markdown(following.b)}}
        return {"annotator": annotator, "done": len(self.pairs) - len(open_pairs), "total": len(self.pairs),
                "can_undo": bool(self.history.get(annotator)), "pair": pair}

    def _append(self, row: dict) -> int:
        """Append one line (one ``write`` to an O_APPEND file, synced) and return its line number."""
        line = (json.dumps(row, sort_keys=True) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write of one line to an O_APPEND file: never interleaved, never half
            os.fsync(fd)
        finally:
            os.close(fd)
        self.lines += 1
        self._apply(row)
        return self.lines

    def add(self, pair_id_: str, choice: str, annotator: str, reason: str = "", skip: tuple[str, ...] = ()) -> dict:
        """Validate and append one label; raise ValueError (nothing written) on bad input. The answer is the
        annotator's new state plus ``recorded``: what was written, and at which line of which file."""
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
               "label_id": uuid.uuid4().hex[:16], "time": now()}
        if reason.strip():
            row["reason"] = reason.strip()
        with self.lock:
            line = self._append(row)
            state = self.state(row["annotator"], skip)
        state["recorded"] = {"action": "label", "pair_id": pair.pair_id, "choice": choice, "line": line,
                             "file": str(self.path)}
        return state

    def undo(self, annotator: str, skip: tuple[str, ...] = ()) -> dict:
        """Retract ``annotator``'s last label that is not yet retracted, by appending a retraction (the file is
        never rewritten); that pair is shown next. ValueError when there is nothing to undo."""
        if not isinstance(annotator, str) or not annotator.strip():
            raise ValueError("annotator: a name is needed")
        annotator = annotator.strip()
        with self.lock:
            history = self.history.get(annotator)
            if not history:
                raise ValueError(f"undo: {annotator!r} has no label to undo")
            label_id, pair_id_ = history[-1]
            line = self._append({"retracts": label_id, "pair_id": pair_id_, "annotator": annotator, "time": now()})
            state = self.state(annotator, tuple(p for p in skip if p != pair_id_))
        state["recorded"] = {"action": "undo", "pair_id": pair_id_, "line": line, "file": str(self.path)}
        return state


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


_MARKDOWN = None


def markdown(text: str) -> str:
    """Markdown to HTML that is safe to insert into the page: markdown-it's CommonMark with raw HTML off (tags
    come out as text) and its link validation (no ``javascript:``/``vbscript:``/``data:`` links)."""
    global _MARKDOWN
    if _MARKDOWN is None:
        from markdown_it import MarkdownIt

        _MARKDOWN = MarkdownIt("commonmark", {"html": False, "linkify": False, "breaks": True})
    return _MARKDOWN.render(text)


MAX_BODY = 100_000  # bytes of one POST: a label with a 500-character reason is well under 2 KB


def skipped(value) -> tuple[str, ...]:
    """The pair ids a client skipped: a comma-separated string or a list of strings (anything else: none)."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value[:10_000] if isinstance(v, str) and v)


def make_handler(store: LabelStore, page: str):
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
                return self._send(200, page.encode(), "text/html; charset=utf-8")
            if url.path == "/api/state":
                query = parse_qs(url.query)
                annotator = query.get("annotator", [""])[0]
                if not annotator.strip():
                    return self._json(400, {"error": "annotator: a name is needed"})
                return self._json(200, store.state(annotator.strip(), skipped(query.get("skip", [""])[0])))
            return self._json(404, {"error": f"no such page: {url.path}"})

        def do_POST(self):
            foreign = self._foreign()
            if foreign:  # a cross-site form or fetch: refused before anything is read
                self.close_connection = True
                return self._json(403, {"error": foreign})
            endpoint = urlparse(self.path).path
            if endpoint not in ("/api/label", "/api/undo"):
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
                skip = skipped(body.get("skip"))
                if endpoint == "/api/undo":
                    state = store.undo(body.get("annotator", ""), skip)
                else:
                    state = store.add(body.get("pair_id"), body.get("choice"), body.get("annotator", ""),
                                      body.get("reason", "") or "", skip)
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
          seed: int = 0, guidelines: str | Path | None = None) -> ThreadingHTTPServer:
    """A ready server (call ``serve_forever``); port 0 picks a free one (``server.server_address``).
    ``guidelines``: a Markdown file shown above the pairs (absent file: ValueError naming it)."""
    store = LabelStore(labels, load_pairs(samples, per_prompt, seed))
    text = "No guidelines were given (`judge.guidelines`)."
    if guidelines is not None:
        if not Path(guidelines).is_file():
            raise ValueError(f"{guidelines}: guidelines file not found (judge.guidelines, or --guidelines)")
        text = Path(guidelines).read_text(encoding="utf-8")
    server = LabelServer((host, port), make_handler(store, PAGE.replace("<!--GUIDELINES-->", markdown(text))))
    server.store = store
    return server


JUDGE_CONFIG = Path("conf/judge/human.yaml")  # the defaults of --labels and --guidelines: one source of truth


def main() -> None:
    judge = {}
    if JUDGE_CONFIG.is_file():
        from omegaconf import OmegaConf

        judge = OmegaConf.to_container(OmegaConf.load(JUDGE_CONFIG))
    parser = argparse.ArgumentParser(description="Serve the preference labelling page on 127.0.0.1.")
    parser.add_argument("--samples", default="data/collect/samples.jsonl", help="collect's samples")
    parser.add_argument("--labels", default=judge.get("labels_file", "data/labels/human.jsonl"),
                        help="label file to append to (default: judge.labels_file of conf/judge/human.yaml)")
    parser.add_argument("--guidelines", default=judge.get("guidelines"),
                        help="Markdown shown above the pairs (default: judge.guidelines of conf/judge/human.yaml)")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1", help="keep 127.0.0.1 unless you know who else can reach it")
    parser.add_argument("--pairs-per-prompt", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="which pairs, and their order on screen")
    args = parser.parse_args()
    try:
        server = serve(args.samples, args.labels, args.host, args.port, args.pairs_per_prompt, args.seed,
                       args.guidelines)
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
<meta http-equiv="Content-Security-Policy" content="default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:">
<style>
body { font-family: system-ui, sans-serif; margin: 0; background: #f6f6f4; color: #222; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd; padding: 10px 24px;
         display: flex; gap: 24px; align-items: center; z-index: 1; }
#progress { font-weight: 600; }
main { max-width: 1100px; margin: 20px auto; padding: 0 24px; }
#guidelines { background: #fffbe6; border: 1px solid #e6d98c; border-radius: 6px; padding: 6px 14px; margin-bottom: 16px; }
#guidelines summary { cursor: pointer; font-weight: 600; }
#prompt { background: #fff; border: 1px solid #ddd; padding: 4px 14px; border-radius: 6px; margin-bottom: 16px; }
.pair { display: flex; gap: 16px; }
.response { flex: 1; background: #fff; border: 2px solid #ddd; border-radius: 6px; padding: 10px 14px; min-height: 80px;
            overflow-wrap: anywhere; }
.response h3 { margin: 0 0 8px; font-size: 14px; color: #666; }
pre, code { font-family: ui-monospace, monospace; background: #f0f0f0; white-space: pre-wrap; }
.buttons { margin: 16px 0; display: flex; gap: 10px; flex-wrap: wrap; }
button { font-size: 15px; padding: 8px 14px; border-radius: 6px; border: 1px solid #aaa; background: #fff; cursor: pointer; }
button:disabled { opacity: 0.5; cursor: default; }
kbd { border: 1px solid #aaa; border-radius: 3px; padding: 0 4px; font-size: 12px; background: #eee; }
#reason { width: 60%; padding: 6px; }
#error { color: #b00020; min-height: 1.2em; }
#confirm { color: #1b5e20; min-height: 1.2em; }
#done { display: none; font-size: 18px; }
#who { display: none; }
#help { display: none; position: fixed; inset: 0; background: rgba(0,0,0,0.35); z-index: 2; }
#help div { background: #fff; max-width: 420px; margin: 80px auto; padding: 16px 24px; border-radius: 8px; }
#help td { padding: 3px 10px; }
</style></head>
<body>
<header><span>posttrain labelling</span><span id="progress">– / –</span><span id="annotator"></span>
<a href="#" id="change">change name</a><span>press <kbd>?</kbd> for keys</span></header>
<main>
<details id="guidelines" open><summary>Guidelines</summary><div id="guidelines-text"><!--GUIDELINES--></div></details>
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
  <button id="skip"><kbd>s</kbd> skip</button>
</div>
</section>
<div class="buttons"><button id="undo" disabled><kbd>u</kbd> undo last label</button></div>
<div id="confirm" role="status"></div>
<div id="error" role="alert"></div>
<p id="done">Every pair is labelled. Thank you. Rerun the chain with <code>judge=human</code>.</p>
</main>
<div id="help" role="dialog" aria-label="keyboard shortcuts"><div><h3>Keys</h3><table>
<tr><td><kbd>1</kbd> <kbd>a</kbd></td><td>A is better</td></tr><tr><td><kbd>2</kbd> <kbd>b</kbd></td><td>B is better</td></tr>
<tr><td><kbd>3</kbd> <kbd>t</kbd></td><td>tie</td></tr><tr><td><kbd>4</kbd> <kbd>x</kbd></td><td>both bad</td></tr>
<tr><td><kbd>s</kbd></td><td>skip (it comes back after the others)</td></tr>
<tr><td><kbd>u</kbd></td><td>undo your last label (recorded as a retraction)</td></tr>
<tr><td><kbd>r</kbd></td><td>type a reason; <kbd>Esc</kbd> leaves the box</td></tr>
<tr><td><kbd>g</kbd></td><td>show or hide the guidelines</td></tr>
<tr><td><kbd>?</kbd> <kbd>Esc</kbd></td><td>show or close this help</td></tr></table></div></div>
<script>
let state = null, busy = false;
const KEYS = {"1": "a", "a": "a", "2": "b", "b": "b", "3": "tie", "t": "tie", "4": "both_bad", "x": "both_bad"};
const SAID = {"a": "A is better", "b": "B is better", "tie": "tie", "both_bad": "both bad"};
const $ = (id) => document.getElementById(id);
function name() { return localStorage.getItem("posttrain.annotator") || ""; }
function skips() { return JSON.parse(sessionStorage.getItem("posttrain.skipped") || "[]"); }
function setSkips(list) { sessionStorage.setItem("posttrain.skipped", JSON.stringify(list)); }
function show(s) {
  state = s;
  $("progress").textContent = s.done + " / " + s.total + " labelled";
  $("annotator").textContent = "annotator: " + s.annotator;
  $("error").textContent = "";
  $("undo").disabled = !s.can_undo;
  if (!s.pair) { $("work").style.display = "none"; $("done").style.display = "block"; return; }
  $("work").style.display = "block"; $("done").style.display = "none";
  // The server renders Markdown with raw HTML disabled and unsafe links refused: safe to insert.
  $("prompt").innerHTML = s.pair.html.prompt;
  $("a-text").innerHTML = s.pair.html.a;
  $("b-text").innerHTML = s.pair.html.b;
  $("reason").value = "";
}
function confirmed(r) {
  if (!r) return;
  const where = " (line " + r.line + " of " + r.file + ")";
  $("confirm").textContent = r.action === "undo" ? "Undone: your last label is retracted" + where + "; the pair is shown again."
    : "Recorded: " + SAID[r.choice] + where + ". Press u to undo.";
}
async function load() {
  if (!name()) { $("who").style.display = "block"; $("work").style.display = "none"; $("name").focus(); return; }
  $("who").style.display = "none";
  const r = await fetch("/api/state?annotator=" + encodeURIComponent(name()) + "&skip=" + encodeURIComponent(skips().join(",")));
  const body = await r.json();
  if (!r.ok) { $("error").textContent = body.error; return; }
  show(body);
}
async function send(path, payload) {
  if (busy) return;
  busy = true;
  try {
    const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify(Object.assign({annotator: name(), skip: skips()}, payload))});
    const body = await r.json();
    if (!r.ok) { $("error").textContent = body.error; return; }
    show(body);
    confirmed(body.recorded);
  } catch (e) { $("error").textContent = "not saved: the server is not reachable (" + e + ")"; }
  finally { busy = false; }
}
function choose(choice) {
  if (!state || !state.pair) return;
  setSkips(skips().filter((id) => id !== state.pair.pair_id));
  send("/api/label", {pair_id: state.pair.pair_id, choice: choice, reason: $("reason").value});
}
function skip() {
  if (!state || !state.pair || busy) return;
  const id = state.pair.pair_id;
  setSkips(skips().filter((x) => x !== id).concat([id]));
  $("confirm").textContent = "Skipped: nothing recorded; the pair comes back after the others.";
  load();
}
function undo() { if (state && state.can_undo) send("/api/undo", {}); }
function help(open) { $("help").style.display = open ? "block" : "none"; }
document.addEventListener("keydown", (e) => {
  if (e.target === $("reason")) { if (e.key === "Escape") $("reason").blur(); return; }
  if (e.target === $("name") || e.ctrlKey || e.metaKey || e.altKey) return;
  const helpOpen = $("help").style.display === "block";
  if (e.key === "?") { e.preventDefault(); help(!helpOpen); return; }
  if (e.key === "Escape") { help(false); return; }
  if (helpOpen) return;
  const key = e.key.toLowerCase(), choice = KEYS[key];
  if (choice) { e.preventDefault(); choose(choice); }
  else if (key === "s") { e.preventDefault(); skip(); }
  else if (key === "u") { e.preventDefault(); undo(); }
  else if (key === "r") { e.preventDefault(); $("reason").focus(); }
  else if (key === "g") { e.preventDefault(); $("guidelines").open = !$("guidelines").open; }
});
document.querySelectorAll("button[data-choice]").forEach((b) => b.addEventListener("click", () => choose(b.dataset.choice)));
$("skip").addEventListener("click", skip);
$("undo").addEventListener("click", undo);
$("help").addEventListener("click", () => help(false));
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
