"""Metric definitions on synthetic streams whose exact answers are known."""

from __future__ import annotations

import pytest

from loadtest.client import assign_chunk_tokens
from loadtest.metrics import compute_run_metrics, distribution, request_metrics
from loadtest.records import Chunk, ErrorKind, RequestRecord
from loadtest.tokenizer import WordTokenizer


def reasoning_then_content() -> RequestRecord:
    """Scheduled at 10.0, sent 2 ms late; two reasoning chunks then two content chunks,
    with 1, 2, 1 and 3 tokens; 7 completion tokens by usage."""
    return RequestRecord(
        index=0,
        scheduled=10.0,
        sent=10.002,
        end=11.05,
        status=200,
        chunks=[
            Chunk(t=10.5, reasoning="a", tokens=1),
            Chunk(t=10.6, reasoning="b c", tokens=2),
            Chunk(t=10.8, content="d", tokens=1),
            Chunk(t=11.0, content="e f g", tokens=3),
        ],
        prompt_tokens=100,
        completion_tokens=7,
    )


def test_reasoning_then_content_exact() -> None:
    m = request_metrics(reasoning_then_content())
    assert m.ttft == pytest.approx(0.5)
    assert m.ttfc == pytest.approx(0.8)
    assert m.tpot == pytest.approx(0.5 / 6)
    assert m.itls == pytest.approx([0.1 / 2, 0.2 / 1, 0.2 / 3])
    assert m.itl_max == pytest.approx(0.2)
    assert m.e2e == pytest.approx(1.05)
    assert m.send_lag == pytest.approx(0.002)
    assert m.output_tokens == 7
    assert m.input_tokens == 100


def test_latency_counts_from_scheduled_not_sent_time() -> None:
    rec = reasoning_then_content()
    rec.sent = 10.4  # the client sent 400 ms late: that delay must show in TTFT and E2E
    m = request_metrics(rec)
    assert m.ttft == pytest.approx(0.5)
    assert m.e2e == pytest.approx(1.05)
    assert m.send_lag == pytest.approx(0.4)


def test_empty_and_role_chunks_do_not_count() -> None:
    rec = reasoning_then_content()
    rec.chunks.insert(0, Chunk(t=10.1))  # role-only / empty delta
    m = request_metrics(rec)
    assert m.ttft == pytest.approx(0.5)
    assert len(m.itls) == 3


def test_tpot_undefined_for_one_token_and_usage_fallback() -> None:
    one = RequestRecord(
        0, 0.0, sent=0.0, end=0.3, status=200, chunks=[Chunk(t=0.2, content="x")], completion_tokens=1
    )
    assert request_metrics(one).tpot is None
    no_usage = RequestRecord(
        1,
        0.0,
        sent=0.0,
        end=1.0,
        status=200,
        chunks=[Chunk(t=0.2, content="x", tokens=2), Chunk(t=0.8, content="y", tokens=2)],
    )
    m = request_metrics(no_usage)
    assert m.output_tokens == 4
    assert m.tpot == pytest.approx(0.6 / 3)
    assert m.itls == pytest.approx([0.3])


def test_non_streamed_request_has_e2e_only() -> None:
    rec = RequestRecord(
        0, 1.0, stream=False, sent=1.0, end=3.5, status=200, completion_tokens=20, prompt_tokens=5
    )
    m = request_metrics(rec)
    assert (m.ttft, m.ttfc, m.tpot) == (None, None, None)
    assert m.e2e == pytest.approx(2.5)
    assert m.output_tokens == 20


def test_percentiles_interpolate_linearly() -> None:
    d = distribution([1.0, 2.0, 3.0, 4.0], [50, 99, 100])
    assert d.percentiles == {"p50": 2.5, "p99": pytest.approx(3.97), "p100": 4.0}
    assert d.mean == 2.5
    assert d.min == 1.0
    assert d.max == 4.0
    assert distribution([], [50]).percentiles == {"p50": None}


def _ok(i: int, scheduled: float, ttft: float, end: float, tokens: int = 4) -> RequestRecord:
    step = (end - scheduled - ttft) / max(tokens - 1, 1)
    chunks = [Chunk(t=scheduled + ttft + k * step, content="w") for k in range(tokens)]
    return RequestRecord(
        i,
        scheduled,
        sent=scheduled,
        end=end,
        status=200,
        chunks=chunks,
        prompt_tokens=10,
        completion_tokens=tokens,
    )


def test_run_level_rates_errors_and_goodput() -> None:
    recs = [
        _ok(0, 0.0, 0.1, 1.0),
        _ok(1, 1.0, 0.5, 2.0),
        _ok(2, 2.0, 0.2, 4.0),  # last byte at 4.0: the run lasts 4 s
        RequestRecord(3, 2.5, sent=2.5, end=2.6, status=429),
        RequestRecord(4, 3.0, sent=3.0, end=3.1, status=503),
        RequestRecord(5, 3.2, sent=3.2, end=3.3, status=500),
        RequestRecord(
            6, 3.4, sent=3.4, end=3.9, status=200, error=ErrorKind.TIMEOUT, chunks=[Chunk(t=3.5, content="x")]
        ),
    ]
    m = compute_run_metrics(recs, percentiles=[50], slos={"ttft": 0.3})
    assert m.duration_s == pytest.approx(4.0)
    assert m.total == 7
    assert m.completed == 3
    assert m.outcomes == {"http_429": 1, "http_500": 1, "http_503": 1, "ok": 3, "timeout": 1}
    assert m.rejection_rate == pytest.approx(2 / 7)
    assert m.error_rate == pytest.approx(2 / 7)
    assert m.request_throughput == pytest.approx(3 / 4)
    assert m.output_tokens == 12
    assert m.output_token_throughput == pytest.approx(12 / 4)
    assert m.total_token_throughput == pytest.approx((12 + 30) / 4)
    # failed requests contribute no latency samples; the timed-out one is not in TTFT
    assert m.distributions["ttft"].count == 3
    assert m.distributions["ttft"].percentiles["p50"] == pytest.approx(0.2)
    assert m.distributions["send_lag"].count == 7
    # goodput: requests 0 and 2 meet TTFT <= 300 ms; failures never count as good
    assert m.good_requests == 2
    assert m.goodput == pytest.approx(2 / 4)
    assert m.slo_attainment == pytest.approx(2 / 7)


def test_tpot_and_itl_slos_use_per_request_values() -> None:
    rec = reasoning_then_content()
    assert compute_run_metrics([rec], slos={"tpot": 0.09}).good_requests == 1
    assert compute_run_metrics([rec], slos={"tpot": 0.08}).good_requests == 0
    assert compute_run_metrics([rec], slos={"itl": 0.2001}).good_requests == 1
    assert compute_run_metrics([rec], slos={"itl": 0.1999}).good_requests == 0
    assert compute_run_metrics([rec], slos={"ttfc": 0.79}).good_requests == 0
    with pytest.raises(ValueError, match="unknown SLO"):
        compute_run_metrics([rec], slos={"latency": 1.0})


def test_assign_chunk_tokens() -> None:
    exact = RequestRecord(
        0,
        0.0,
        status=200,
        completion_tokens=2,
        chunks=[Chunk(t=1, content="a b c", tokens=9), Chunk(t=2, content="d", tokens=9)],
    )
    retok = RequestRecord(
        1,
        0.0,
        status=200,
        completion_tokens=5,
        chunks=[Chunk(t=1, reasoning="a b c"), Chunk(t=2, content="d e")],
    )
    scaled = RequestRecord(
        2,
        0.0,
        status=200,
        completion_tokens=10,
        chunks=[Chunk(t=1, content="a b c"), Chunk(t=2, content="d")],
    )
    untok = RequestRecord(
        3, 0.0, status=200, completion_tokens=5, chunks=[Chunk(t=1, content="x y"), Chunk(t=2, content="z")]
    )
    assign_chunk_tokens([exact, retok, scaled], WordTokenizer())
    assign_chunk_tokens([untok], None)
    assert [c.tokens for c in exact.chunks] == [1, 1]
    assert [c.tokens for c in retok.chunks] == [3, 2]
    # 3:1 split of the 10 tokens the server reported
    assert [c.tokens for c in scaled.chunks] == [7, 3]
    assert sum(c.tokens for c in untok.chunks) == 5


def test_record_round_trip() -> None:
    rec = reasoning_then_content()
    back = RequestRecord.from_dict(rec.to_dict())
    assert request_metrics(back) == request_metrics(rec)
