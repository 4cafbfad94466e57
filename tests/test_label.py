"""The labelling page: the store's rules, bad requests, and an end-to-end run in headless Chromium that
labels with the keyboard, kills the server, restarts it, and imports exactly those labels."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import expect

from conftest import copy_chain, run_stage, subprocess_env
from pipeline.browser import browser_page, chromium_path
from pipeline.label import LabelStore, load_pairs

needs_chromium = pytest.mark.skipif(chromium_path() is None and not os.environ.get("CI"),
                                    reason="no Chromium here (CI installs Debian's chromium and runs this)")


def write_samples(path: Path) -> Path:
    rows = [{"prompt_id": f"p{i}", "prompt": f"What number comes after {i}?", "meta": {},
             "samples": [{"text": str(i + 1), "finished": True}, {"text": f"Let me think. The answer is {i + 1}.",
                                                                   "finished": True},
                         {"text": str(i + 1), "finished": True}, {"text": "unfinished", "finished": False}]}
            for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_are_distinct_finished_responses_in_a_recorded_random_order(tmp_path):
    pairs = load_pairs(write_samples(tmp_path / "samples.jsonl"))
    assert len(pairs) == 5 and all(p.a != p.b and "unfinished" not in (p.a, p.b) for p in pairs)
    assert {p.order for p in pairs} == {"ab", "ba"}                  # both orders occur (seeded)
    assert load_pairs(tmp_path / "samples.jsonl") == pairs           # same seed, same pairs and order


def test_bad_choices_and_unknown_pairs_change_nothing(tmp_path):
    labels = tmp_path / "labels.jsonl"
    store = LabelStore(labels, load_pairs(write_samples(tmp_path / "samples.jsonl")))
    first = store.state("ana")["pair"]["pair_id"]
    for pair_id, choice, who, message in ((first, "maybe", "ana", "choice"), ("nope", "a", "ana", "pair_id"),
                                          (first, "a", " ", "annotator")):
        with pytest.raises(ValueError, match=message):
            store.add(pair_id, choice, who)
    assert not labels.exists() and store.state("ana")["done"] == 0
    store.add(first, "tie", "ana", reason="same number")
    row = json.loads(labels.read_text())
    assert row["choice"] == "tie" and row["reason"] == "same number" and row["pair_id"] == first
    assert store.state("ana")["done"] == 1 and store.state("bo")["done"] == 0   # per annotator


def test_undo_appends_a_retraction_that_the_human_judge_applies_and_the_file_is_never_rewritten(tmp_path):
    from pipeline.judges import read_labels

    labels = tmp_path / "labels.jsonl"
    store = LabelStore(labels, load_pairs(write_samples(tmp_path / "samples.jsonl")))
    first = store.state("ana")["pair"]["pair_id"]
    answer = store.add(first, "a", "ana")
    assert answer["recorded"] == {"action": "label", "pair_id": first, "choice": "a", "line": 1, "file": str(labels)}
    second = answer["pair"]["pair_id"]
    store.add(second, "b", "ana")
    store.add(first, "tie", "bo")                                     # another annotator's label is not ana's to undo
    before = labels.read_text()
    answer = store.undo("ana")
    assert answer["recorded"]["action"] == "undo" and answer["recorded"]["pair_id"] == second
    assert answer["pair"]["pair_id"] == second and answer["done"] == 1  # the retracted pair is shown again
    assert labels.read_text().startswith(before)                        # appended, not rewritten
    retraction = json.loads(labels.read_text().splitlines()[-1])
    assert retraction["retracts"] == json.loads(before.splitlines()[1])["label_id"]
    kept = read_labels(labels)
    assert [(r["annotator"], r["choice"]) for r in kept] == [("ana", "a"), ("bo", "tie")]
    assert LabelStore(labels, store.pairs).state("ana")["done"] == 1     # a restart sees the retraction too
    store.undo("ana")
    with pytest.raises(ValueError, match="no label to undo"):
        store.undo("ana")
    assert [r["annotator"] for r in read_labels(labels)] == ["bo"]


def test_a_label_without_an_id_is_retracted_by_its_line_number(tmp_path):
    from pipeline.judges import read_labels

    labels = tmp_path / "labels.jsonl"
    old = {"prompt_id": "p0", "response_a": "1", "response_b": "2", "choice": "a", "annotator": "ana", "pair_id": "x"}
    labels.write_text(json.dumps(old) + "\n")
    store = LabelStore(labels, load_pairs(write_samples(tmp_path / "samples.jsonl")))
    assert store.undo("ana")["recorded"]["line"] == 2
    assert json.loads(labels.read_text().splitlines()[1])["retracts"] == "line-1"
    assert read_labels(labels) == []                                   # the one label is retracted


def test_skipped_pairs_come_last_and_come_back_when_only_they_remain(tmp_path):
    store = LabelStore(tmp_path / "labels.jsonl", load_pairs(write_samples(tmp_path / "samples.jsonl")))
    ids = [p.pair_id for p in store.pairs]
    assert store.state("ana", skip=(ids[0],))["pair"]["pair_id"] == ids[1]
    for pair in ids[1:]:
        store.add(pair, "a", "ana")
    assert store.state("ana", skip=(ids[0],))["pair"]["pair_id"] == ids[0]   # only the skipped one is left


@pytest.mark.parametrize("text, absent", [
    ("<script>alert(1)</script>", "<script"),
    ("<img src=x onerror=alert(1)>", "<img"),
    ("[click](javascript:alert(1))", "href"),
])
def test_markdown_is_rendered_with_raw_html_shown_as_text_and_unsafe_links_refused(text, absent):
    from pipeline.label import markdown

    assert absent not in markdown(text)
    assert "<strong>bold</strong>" in markdown("**bold**") and "<code>x = 1</code>" in markdown("`x = 1`")


def test_the_guidelines_file_is_served_on_the_page_and_a_missing_one_is_named(tmp_path):
    from pipeline.label import serve

    samples = write_samples(tmp_path / "samples.jsonl")
    with pytest.raises(ValueError, match="nope.md: guidelines file not found"):
        serve(samples, tmp_path / "labels.jsonl", port=0, guidelines=tmp_path / "nope.md")
    server = serve(samples, tmp_path / "labels.jsonl", port=0, guidelines="conf/judge/guidelines.md")
    threading_serve(server)
    try:
        page = urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/", timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert "<strong>Correct first.</strong>" in page


def threading_serve(server) -> None:
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()


def test_concurrent_posts_append_whole_lines_and_each_accepted_request_exactly_once(tmp_path):
    """Many labels posted at once, long reasons included: every line of the file parses, and the lines are
    exactly the accepted requests, each once (one write per line on an O_APPEND file, under a lock)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.label import CHOICES, serve

    labels = tmp_path / "labels.jsonl"
    server = serve(write_samples(tmp_path / "samples.jsonl"), labels, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    sent = [{"pair_id": p.pair_id, "choice": CHOICES[i % len(CHOICES)], "annotator": f"annotator-{i}",
             "reason": f"reason {i} " + "x" * (i * 7 % 480)} for i in range(60) for p in server.store.pairs]
    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            answers = list(pool.map(lambda body: post(port, body)[0], sent))
    finally:
        server.shutdown()
        server.server_close()
    accepted = [body for body, status in zip(sent, answers, strict=True) if status == 200]
    assert len(accepted) == len(sent) == 300                         # every request answered and accepted
    written = [json.loads(line) for line in labels.read_text().splitlines()]  # every line parses
    key = lambda r: (r["annotator"], r["pair_id"], r["choice"], r["reason"].strip())
    assert sorted(map(key, written)) == sorted(map(key, accepted))   # each accepted request exactly once


def raw_request(port: int, method: str, body: bytes = b"", headers: dict | None = None,
                timeout: float = 5) -> tuple[int, dict]:
    """One request with exactly these headers (http.client adds only what is not given)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, "/api/label" if method == "POST" else "/api/state?annotator=ana",
                        skip_host="Host" in (headers or {}), skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        conn.endheaders(body or None)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


@pytest.fixture()
def label_server(tmp_path):
    import threading

    from pipeline.label import serve

    server = serve(write_samples(tmp_path / "samples.jsonl"), tmp_path / "labels.jsonl", port=0)
    server.RequestHandlerClass.timeout = 1  # a stalled client is dropped after 1 s here (10 s by default)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_cross_site_and_rebinding_requests_are_refused_and_write_nothing(label_server, tmp_path):
    port = label_server.server_address[1]
    good = json.dumps({"pair_id": label_server.store.pairs[0].pair_id, "choice": "a", "annotator": "ana"}).encode()
    own = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Content-Length": str(len(good))}
    for headers, status in [({**own, "Origin": "http://evil.example"}, 403),          # a page of another site
                            ({**own, "Host": f"evil.example:{port}"}, 403),            # DNS rebinding
                            ({**own, "Content-Type": "text/plain"}, 415)]:             # a cross-site simple POST
        assert raw_request(port, "POST", good, headers)[0] == status
    assert raw_request(port, "GET", headers={"Host": f"rebound.example:{port}"})[0] == 403
    assert not (tmp_path / "labels.jsonl").exists()
    assert raw_request(port, "POST", good, {**own, "Origin": f"http://localhost:{port}"})[0] == 200  # the page itself
    assert len((tmp_path / "labels.jsonl").read_text().splitlines()) == 1


def test_bodies_are_bounded_and_every_bad_request_is_answered(label_server, tmp_path):
    import time as clock

    port = label_server.server_address[1]
    own = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json"}
    assert raw_request(port, "POST", b"{}", {**own, "Content-Length": "-5"})[0] == 413
    assert raw_request(port, "POST", b"{}", {**own, "Content-Length": str(10**9)})[0] == 413
    assert raw_request(port, "POST", b"", own)[0] == 411
    deep = b"[" * 45_000 + b"]" * 45_000  # nested past Python's recursion limit
    status, body = raw_request(port, "POST", deep, {**own, "Content-Length": str(len(deep))})
    assert status == 400 and "nested too deeply" in body["error"]
    start = clock.perf_counter()  # announces 1000 bytes, sends 10: dropped after the handler's timeout, no hang
    try:
        raw_request(port, "POST", b'{"a": 1}  ', {**own, "Content-Length": "1000"}, timeout=5)
    except Exception:  # the server closes the connection without an answer: the client sees it closed
        pass
    assert clock.perf_counter() - start < 4
    assert raw_request(port, "GET", headers={"Host": f"127.0.0.1:{port}"})[0] == 200  # still serving


@pytest.mark.parametrize("line", ["[1, 2]", "17", "{not json"])
def test_a_corrupt_label_line_is_named_at_start_up_and_the_file_is_left_alone(tmp_path, line):
    labels = tmp_path / "labels.jsonl"
    text = json.dumps({"pair_id": "x", "annotator": "ana"}) + "\n" + line + "\n"
    labels.write_text(text)
    with pytest.raises(ValueError, match=r"labels.jsonl:2: "):
        LabelStore(labels, load_pairs(write_samples(tmp_path / "samples.jsonl")))
    assert labels.read_text() == text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on ``port`` (Linux's /proc/net/tcp and tcp6)."""
    import ipaddress

    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(raw)))
    return found


def start_server(cwd: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.label", "--port", str(port)], cwd=cwd,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state?annotator=probe", timeout=1)
            return proc
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                raise AssertionError(f"label server exited: {proc.stdout.read()}") from None
            time.sleep(0.1)
    raise AssertionError("label server did not start")


def post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/label", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@needs_chromium
@pytest.mark.slow
def test_label_with_the_keyboard_kill_restart_resume_and_import(pairs_chain, tmp_path, monkeypatch):
    work = copy_chain(pairs_chain, tmp_path / "chain")
    monkeypatch.chdir(work)
    labels = work / "data" / "labels" / "human.jsonl"
    labels.unlink(missing_ok=True)
    port = free_port()
    server = start_server(work, port)
    try:
        assert f"at http://127.0.0.1:{port}/" in server.stdout.readline()   # what it announces ...
        assert listening_addresses(port) == {"127.0.0.1"}                  # ... is the only address it binds
        with browser_page() as page:
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#name", "ana")
            page.press("#name", "Enter")
            page.wait_for_selector("#progress:has-text('0 / ')")
            total = int(page.text_content("#progress").split("/")[1].split()[0])
            assert total >= 4
            shown = []
            for key, done in (("1", 1), ("b", 2), ("3", 3)):
                shown.append(tuple(page.evaluate("[state.pair.a, state.pair.b]")))  # the raw texts, not rendered
                page.keyboard.press(key)
                page.wait_for_selector(f"#progress:has-text('{done} / {total}')")
            page.fill("#reason", "shorter is better")
            page.press("#reason", "Escape")
            before_kill = tuple(page.evaluate("[state.pair.a, state.pair.b]"))
            page.screenshot(path=str(tmp_path / "label.png"))
        status, body = post(port, {"pair_id": "not-a-pair", "choice": "a", "annotator": "ana"})
        assert status == 400 and "pair_id" in body["error"]
        status, body = post(port, {"pair_id": "x", "choice": "better", "annotator": "ana"})
        assert status == 400 and "choice" in body["error"]
    finally:
        server.send_signal(signal.SIGKILL)                          # no clean shutdown
        server.wait()
    written = [json.loads(line) for line in labels.read_text().splitlines()]
    assert [r["choice"] for r in written] == ["a", "b", "tie"] and {r["annotator"] for r in written} == {"ana"}
    assert [(r["response_a"], r["response_b"]) for r in written] == shown

    server = start_server(work, port)
    try:
        with browser_page() as page:
            page.add_init_script("localStorage.setItem('posttrain.annotator', 'ana')")
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector(f"#progress:has-text('3 / {total}')")   # resumes after the three labels
            assert tuple(page.evaluate("[state.pair.a, state.pair.b]")) == before_kill
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    assert (tmp_path / "label.png").stat().st_size > 5_000

    collected_before = [json.loads(l) for l in Path("data/collect/pairs.jsonl").read_text().splitlines()]
    metrics = run_stage("collect", "judge=human")
    assert metrics["judge/labels"] == 3 and metrics["judge/unmatched_pairs"] == 0
    pairs = [json.loads(l) for l in Path("data/collect/pairs.jsonl").read_text().splitlines()]
    expected = set()
    for r in written:
        if r["choice"] in ("a", "b"):
            win, lose = (r["response_a"], r["response_b"]) if r["choice"] == "a" else (r["response_b"], r["response_a"])
            expected.add((r["prompt_id"], win, lose))
    assert {(p["prompt_id"], p["chosen"], p["rejected"]) for p in pairs} == expected
    assert all(p["judge"] == "human" for p in pairs) and collected_before != pairs


@needs_chromium
@pytest.mark.slow
def test_page_shows_guidelines_markdown_confirmations_skip_undo_and_key_help_in_chromium(tmp_path):
    from pipeline.judges import read_labels
    from pipeline.label import serve

    samples = write_samples(tmp_path / "samples.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    rows[0]["prompt"] = "Compute **twice** `x`. <script>window.injected = 1</script>"
    rows[0]["samples"][1]["text"] = "<img src=x onerror='window.injected = 2'> The answer is *2*."
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = tmp_path / "labels.jsonl"
    server = serve(samples, labels, port=0, guidelines="conf/judge/guidelines.md")
    threading_serve(server)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with browser_page() as page:
            page.add_init_script("localStorage.setItem('posttrain.annotator', 'ana')")
            page.goto(url)
            page.wait_for_selector("#progress:has-text('0 / 5')")
            assert page.is_visible("#guidelines-text strong:has-text('Correct first.')")
            first = page.text_content("#prompt")
            page.keyboard.press("?")
            assert page.is_visible("#help") and "undo" in page.text_content("#help")
            page.keyboard.press("Escape")
            assert not page.is_visible("#help")
            page.keyboard.press("s")                                   # skip: another pair, nothing written
            page.wait_for_selector("#confirm:has-text('Skipped')")
            # expect() polls through Playwright's own injected script; a string predicate (wait_for_function) is
            # evaluated with eval, which the page's Content-Security-Policy forbids (it failed once in CI)
            expect(page.locator("#prompt")).not_to_have_text(first)
            assert not labels.exists()
            page.keyboard.press("1")
            page.wait_for_selector("#confirm:has-text('Recorded: A is better (line 1 of')")
            page.keyboard.press("2")
            page.wait_for_selector("#progress:has-text('2 / 5')")
            page.keyboard.press("u")                                   # undo the second label
            page.wait_for_selector("#confirm:has-text('Undone')")
            page.wait_for_selector("#progress:has-text('1 / 5')")
            page.keyboard.press("3")
            page.wait_for_selector("#progress:has-text('2 / 5')")
            for done in (3, 4):
                page.keyboard.press("t")
                page.wait_for_selector(f"#progress:has-text('{done} / 5')")
            # only the skipped pair is left: it comes back, its Markdown rendered and its HTML shown as text
            assert page.text_content("#prompt") == first
            assert page.is_visible("#prompt strong:has-text('twice')") and page.is_visible("#prompt code")
            assert "<script>" in page.text_content("#prompt")
            assert page.evaluate("window.injected === undefined") and page.locator("#prompt script, .response img").count() == 0
            page.screenshot(path=str(tmp_path / "label.png"))
    finally:
        server.shutdown()
        server.server_close()
    lines = [json.loads(line) for line in labels.read_text().splitlines()]
    assert ["retracts" in r for r in lines] == [False, False, True, False, False, False]
    assert [r["choice"] for r in read_labels(labels)] == ["a", "tie", "tie", "tie"]
