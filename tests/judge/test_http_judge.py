"""HTTPJudge against a tiny OpenAI-compatible server on 127.0.0.1 (no outside network)."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from emokernels.judge import get_judge
from emokernels.judge.http import HTTPJudge, JudgeResponseError, parse_match


class FakeServer:
    """Answers each POST from a script: text -> list of (status, content) to play in order."""

    def __init__(self):
        self.requests, self.script, self.lock = [], {}, threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    user = body["messages"][-1]["content"]
                    text = user.split('"""')[1]
                    plays = outer.script.get(text, [(200, '{"match": 0, "reason": "unscripted"}')])
                    status, content = plays.pop(0) if len(plays) > 1 else plays[0]
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                if status == 200:
                    self.wfile.write(json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode())

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def test_parse_match_variants():
    assert parse_match('{"match": 1, "reason": "angry tone"}') == (True, "angry tone")
    assert parse_match('```json\n{"match": 0, "reason": "calm"}\n```') == (False, "calm")
    assert parse_match('Sure! {"match": "1"}') == (True, "")
    for bad in ("no json here", '{"reason": "x"}', '{"match": 2}', "{not json}"):
        with pytest.raises(JudgeResponseError):
            parse_match(bad)


def test_http_judge_round_trip(server):
    server.script = {
        "I am furious!": [(200, '```json\n{"match": 1, "reason": "angry"}\n```')],
        "Call them tomorrow.": [(200, '{"match": 0, "reason": "neutral advice"}')],
        "flaky": [(500, ""), (200, '{"match": 1, "reason": "ok after retry"}')],
        "garbage": [(200, "I think it matches")],
    }
    judge = HTTPJudge(base_url=server.url, model="fake-judge", api_key="sk-test", retries=2, backoff=0.01, workers=2)
    out = judge.classify(["I am furious!", "Call them tomorrow.", "flaky", "garbage"], ["anger", "anger", "fear", "disgust"])
    assert [j.label for j in out] == ["anger", "other", "fear", "error"]
    assert [j.match for j in out] == [True, False, True, False]
    assert out[2].reason == "ok after retry" and "JudgeResponseError" in out[3].reason
    body = server.requests[0]["body"]
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert server.requests[0]["auth"] == "Bearer sk-test"
    assert body["temperature"] == 0 and body["model"] == "fake-judge"
    assert "Target emotion:" in body["messages"][1]["content"] and "style" in body["messages"][0]["content"]
    # garbage was retried (1 + 2 retries); flaky needed 2 calls
    texts = [r["body"]["messages"][1]["content"].split('"""')[1] for r in server.requests]
    assert texts.count("garbage") == 3 and texts.count("flaky") == 2


def test_http_judge_needs_settings_and_targets(monkeypatch, server):
    for var in ("EMOKERNELS_JUDGE_URL", "EMOKERNELS_JUDGE_MODEL", "EMOKERNELS_JUDGE_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="EMOKERNELS_JUDGE_URL"):
        HTTPJudge()
    monkeypatch.setenv("EMOKERNELS_JUDGE_URL", server.url)
    with pytest.raises(ValueError, match="EMOKERNELS_JUDGE_MODEL"):
        HTTPJudge()
    monkeypatch.setenv("EMOKERNELS_JUDGE_MODEL", "m")
    judge = get_judge("http", retries=0)
    assert judge.base_url == server.url
    with pytest.raises(ValueError, match="targets"):
        judge.classify(["x"])
    with pytest.raises(ValueError, match="neutral"):
        judge.classify(["x"], ["neutral"])


def test_http_judge_unreachable_is_an_error_judgement():
    judge = HTTPJudge(base_url="http://127.0.0.1:9/v1", model="m", retries=1, backoff=0.01, timeout=2)
    (j,) = judge.classify(["text"], ["anger"])
    assert j.label == "error" and j.match is False and j.reason


def test_judge_rows_never_stores_an_unavailable_judge_and_resumes(server, tmp_path, capsys, monkeypatch):
    """The endpoint fails for one reply (after its retries): the run stops with a clear error and a
    non-zero exit, that row stays pending (never written as a verdict), and a rerun judges it once
    the endpoint answers again."""
    from emokernels.cli import main
    from emokernels.io import read_jsonl
    from emokernels.judge.base import JudgeUnavailableError
    from emokernels.judge.rows import judge_rows

    rows = [{"key": f"k{i}", "text": t, "emotion": "anger"} for i, t in enumerate(["fine one", "broken one", "later one"])]
    server.script = {"fine one": [(200, '{"match": 1}')], "broken one": [(503, "")], "later one": [(200, '{"match": 0}')]}
    judge = HTTPJudge(base_url=server.url, model="m", retries=1, backoff=0.01, timeout=5)
    out = tmp_path / "judged.jsonl"
    with pytest.raises(JudgeUnavailableError, match=r"'k1'.*HTTP 503.*2 row\(s\) stay pending"):
        judge_rows(rows, judge, out, batch_size=2, progress=False)
    assert [r["key"] for r in read_jsonl(out)] == ["k0"]
    # an error row left in the file by an older version is dropped, not read as a verdict
    with open(out, "a") as f:
        f.write(json.dumps({**rows[1], "label": "error", "match": False, "judge": judge.describe()}) + "\n")
    server.script["broken one"] = [(200, '{"match": 1}')]
    judged = judge_rows(rows, judge, out, batch_size=2, progress=False)
    assert [r["label"] for r in judged] == ["anger", "anger", "other"]
    assert sorted(r["key"] for r in read_jsonl(out)) == ["k0", "k1", "k2"]
    # the CLI: one line, non-zero exit (backoff sleeps skipped)
    import emokernels.judge.http as http_mod

    monkeypatch.setattr(http_mod.time, "sleep", lambda s: None)
    monkeypatch.setenv("EMOKERNELS_JUDGE_URL", server.url)
    monkeypatch.setenv("EMOKERNELS_JUDGE_MODEL", "m")
    gens = tmp_path / "g.jsonl"
    gens.write_text("".join(json.dumps(r) + "\n" for r in rows))
    server.script["fine one"] = [(500, "")]
    rc = main(["judge", "--in", str(gens), "--judge", "http", "--out", str(tmp_path / "j2.jsonl"), "--no-progress"])
    assert rc == 2 and "could not be judged" in capsys.readouterr().err
