"""Fuzz: the readers of user files and the label server take random, truncated, huge and deeply nested input
and answer with a clear error (or accept it), never a traceback or a dropped connection. Seeded, bounded."""

from __future__ import annotations

import json
import random
import threading

import pytest

from pipeline.chat import InputError, load_files, read_prompts
from pipeline.judges import read_labels
from pipeline.preferences import read_pairs

GOOD_ROW = {"prompt": "Add 2 and 3.", "response": "5"}
GOOD_PAIR = {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "6"}


def nasty_lines(rng: random.Random, good: dict) -> list[bytes]:
    """One file's lines: good rows mixed with random bytes, random JSON, truncations, huge and nested lines."""
    text = json.dumps(good)
    makers = [
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80))),              # random bytes
        lambda: text[:rng.randrange(len(text))].encode(),                                      # truncated
        lambda: json.dumps(rng.choice([None, 1, "s", [1], {"x": 1}, {"prompt": 1}, {"messages": "no"},
                                       {**good, "meta": [1]}, {k: None for k in good}])).encode(),
        lambda: ("[" * rng.choice([10, 5_000, 60_000]) + "]" * 3).encode(),                      # nested, unbalanced
        lambda: json.dumps({**good, **{k: "x" * 200_000 for k in list(good)[:1]}}).encode(),    # huge
        lambda: b"\xef\xbb\xbf" + text.encode(),                                                 # a BOM mid-file
        lambda: text.encode("utf-16"),
        lambda: text.encode(),
    ]
    return [rng.choice(makers)() for _ in range(rng.randrange(1, 12))]


@pytest.mark.parametrize("seed", range(40))
def test_row_readers_answer_every_input_with_rows_or_a_named_error(tmp_path, seed):
    rng = random.Random(seed)
    rows_file, pairs_file, labels_file, prompts_file = (tmp_path / f"{n}.jsonl" for n in ("rows", "pairs", "labels", "prompts"))
    rows_file.write_bytes(b"\n".join(nasty_lines(rng, GOOD_ROW)) + b"\n")
    pairs_file.write_bytes(b"\n".join(nasty_lines(rng, GOOD_PAIR)) + b"\n")
    labels_file.write_bytes(b"\n".join(nasty_lines(rng, {"prompt_id": "p", "response_a": "x", "response_b": "y",
                                                         "choice": "a", "annotator": "ana"})) + b"\n")
    prompts_file.write_bytes(b"\n".join(nasty_lines(rng, {"messages": [{"role": "user", "content": "hi"},
                                                                       {"role": "assistant", "content": "ho"}]})) + b"\n")
    for read in (lambda: load_files([str(rows_file)], "auto", "error"),
                 lambda: load_files([str(rows_file)], "auto", "skip"),
                 lambda: read_pairs(pairs_file),
                 lambda: read_labels(labels_file),
                 lambda: read_prompts(prompts_file)):
        try:
            read()
        except InputError as err:
            message = str(err)
            assert "\n" not in message and str(tmp_path) in message, message  # one line, naming the file
        except ValueError as err:  # the label reader's own error type: the same contract
            assert "\n" not in str(err) and str(tmp_path) in str(err), str(err)


def test_the_label_server_answers_every_fuzzed_request_and_keeps_serving(tmp_path):
    import http.client

    from test_label import write_samples

    from pipeline.label import serve

    server = serve(write_samples(tmp_path / "samples.jsonl"), tmp_path / "labels.jsonl", port=0)
    server.RequestHandlerClass.timeout = 1
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    rng = random.Random(0)
    pair = server.store.pairs[0].pair_id
    bodies = [b"", b"{}", b"null", b"[" * 60_000, json.dumps({"pair_id": pair, "choice": "a", "annotator": "x" * 5000}).encode(),
              json.dumps({"pair_id": [pair], "choice": {"a": 1}, "annotator": 3, "reason": ["r"]}).encode(),
              bytes(rng.randrange(256) for _ in range(300)), json.dumps({"pair_id": pair, "choice": "tie",
                                                                         "annotator": "ana", "reason": "r" * 501}).encode()]
    statuses = []
    try:
        for _ in range(60):
            body = rng.choice(bodies)
            headers = {"Host": f"127.0.0.1:{port}", "Content-Type": rng.choice(["application/json", "text/plain",
                                                                               "application/json; charset=utf-8"])}
            length = rng.choice([str(len(body)), "-1", "abc", str(len(body) + 3), str(10**12)])
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                method = rng.choice(["POST", "POST", "GET", "PUT"])
                path = rng.choice(["/api/label", "/api/state?annotator=" + "%" * rng.randrange(3), "/", "/../etc/passwd"])
                conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for key, value in {**headers, "Content-Length": length}.items():
                    conn.putheader(key, value)
                conn.endheaders(body or None)
                response = conn.getresponse()
                statuses.append(response.status)
                response.read()
            except (ConnectionError, http.client.HTTPException, TimeoutError):
                statuses.append(None)  # dropped: only allowed for a body shorter than announced (the 1 s timeout)
                assert length == str(len(body) + 3), (method, path, length)
            finally:
                conn.close()
        state = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        state.request("GET", "/api/state?annotator=ana", headers={"Host": f"127.0.0.1:{port}"})
        assert state.getresponse().status == 200  # still serving
    finally:
        server.shutdown()
        server.server_close()
    assert all(s is None or 200 <= s < 600 for s in statuses)
    labels = tmp_path / "labels.jsonl"
    if labels.exists():  # whatever was accepted is whole lines of labels
        assert all(isinstance(json.loads(line), dict) for line in labels.read_text().splitlines())
