"""serving.bench.loadtest: locust's --csv stats -> per-class percentiles and SLO verdicts."""

import json

import pytest

from serving.bench import loadtest

HEADER = ("Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,"
          "Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,"
          "50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%")


def row(typ, name, reqs, fails, p50, p90, p99, rps=1.0):
    return f"{typ},{name},{reqs},{fails},{p50},{p50},1,{p99},0,{rps},0,{p50},{p50},{p90},{p90},{p90},{p99},{p99},{p99},{p99},{p99},{p99}"


def write(tmp_path, *rows):
    prefix = tmp_path / "run"
    lines = [HEADER, *rows, "POST,Aggregated,0,0,0,0,0,0,0,0,0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A"]
    (tmp_path / "run_stats.csv").write_text("\n".join(lines) + "\n")
    return str(prefix)


SLO = {"agent": {"ttft_p90_ms": 500, "max_failure_rate": 0},
       "voice": {"ttft_p99_ms": 300, "max_failure_rate": 0.01},
       "batch": {"e2e_p90_ms": 30000}}


@pytest.mark.parametrize("rows, verdicts, passed", [
    pytest.param([row("POST", "agent", 100, 0, 900, 2000, 4000), row("TTFT", "agent", 100, 0, 200, 450, 900)],
                 {"agent": "pass", "voice": "skipped", "batch": "skipped"}, True, id="within-slo-others-skipped"),
    pytest.param([row("POST", "agent", 100, 1, 900, 2000, 4000), row("TTFT", "agent", 99, 0, 200, 450, 900)],
                 {"agent": "fail"}, False, id="one-failure-fails-agent"),
    pytest.param([row("POST", "voice", 50, 0, 200, 300, 500), row("TTFT", "voice", 50, 0, 100, 200, 310)],
                 {"voice": "fail"}, False, id="ttft-p99-over"),
    pytest.param([row("POST", "voice", 50, 0, 200, 300, 500)], {"voice": "fail"}, False,
                 id="no-ttft-data-is-not-a-pass"),
    pytest.param([row("POST", "batch", 10, 0, 5000, 29000, 40000)], {"batch": "pass"}, True, id="batch-e2e"),
    pytest.param([], {"agent": "skipped"}, False, id="no-requests-at-all-fails"),
])
def test_verdicts(tmp_path, rows, verdicts, passed):
    s = loadtest.summarize(loadtest.read_stats(loadtest.Path(write(tmp_path, *rows) + "_stats.csv")), SLO)
    assert {k: s["classes"][k]["slo"]["verdict"] for k in verdicts} == verdicts
    assert s["passed"] is passed


def test_main_writes_json_and_text(tmp_path, capsys):
    slo = tmp_path / "slo.yaml"
    slo.write_text("agent: {ttft_p90_ms: 500, ttft_p99_ms: 800}\n")
    prefix = write(tmp_path, row("POST", "agent", 120, 0, 900, 2000, 4000),
                   row("TTFT", "agent", 120, 0, 200, 450, 900))
    assert loadtest.main([prefix, "--slo", str(slo)]) == 1
    s = json.loads((tmp_path / "run_summary.json").read_text())
    agent = s["classes"]["agent"]
    assert agent["ttft_ms"] == {"50": 200.0, "90": 450.0, "99": 900.0}
    assert agent["e2e_ms"]["99"] == 4000.0 and agent["requests"] == 120
    assert agent["slo"]["checks"]["ttft_p99_ms"] == {"limit": 800, "actual": 900.0, "ok": False}
    text = (tmp_path / "run_summary.txt").read_text()
    assert "fail (ttft_p99_ms)" in text and "overall: FAIL" in text
    assert text.strip() == capsys.readouterr().out.strip()


def test_unknown_slo_key_is_named(tmp_path):
    prefix = write(tmp_path, row("POST", "agent", 1, 0, 1, 1, 1))
    with pytest.raises(ValueError, match="ttft_p12_ms"):
        loadtest.summarize(loadtest.read_stats(loadtest.Path(prefix + "_stats.csv")), {"agent": {"ttft_p12_ms": 1}})
