"""Prometheus metrics for the server (text format at GET /metrics).

Each app owns its own CollectorRegistry, so several servers (tests, benchmarks) can live in
one process. Engine gauges (queue depth, running requests, KV blocks, tokens/s, time per
step, batch occupancy) are read at scrape time from the snapshot the engine thread
publishes, never from the engine itself, which belongs to that thread.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from qkv.serve.async_engine import AsyncEngine

disable_created_metrics()  # the *_created series only add noise to a scrape
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _EngineCollector:
    def __init__(self, aengine: AsyncEngine, model_name: str):
        self.aengine, self.model_name = aengine, model_name

    def collect(self):
        s = self.aengine.stats
        lab = ["model"]

        def g(name, doc, value):
            return _gauge(name, doc, lab, [self.model_name], value)

        yield g("qkv_queue_depth", "Requests waiting to be scheduled", s.get("num_waiting", 0))
        yield g("qkv_requests_running", "Requests in the running batch", s.get("num_running", 0))
        yield g("qkv_requests_in_flight", "Requests admitted by the server and not finished", self.aengine.in_flight)
        yield g("qkv_kv_blocks_total", "KV-cache blocks in the pool", s.get("blocks_total", 0))
        yield g("qkv_kv_blocks_used", "KV-cache blocks holding live requests", s.get("blocks_used", 0))
        yield g("qkv_kv_blocks_free", "KV-cache blocks available", s.get("blocks_free", 0))
        yield g("qkv_tokens_per_second", "Generated tokens per second (last ~5 s)", self.aengine.tokens_per_second)
        yield g("qkv_step_seconds", "Mean wall time of one engine step (last ~5 s)", self.aengine.seconds_per_step)
        yield g("qkv_batch_rows", "Mean sequences per engine step (last ~5 s)", self.aengine.rows_per_step)
        yield g(
            "qkv_batch_occupancy",
            "Mean sequences per engine step over --max-num-seqs (last ~5 s)",
            self.aengine.batch_occupancy,
        )
        yield g("qkv_engine_up", "1 while the engine loop runs", 1.0 if self.aengine.alive else 0.0)
        c = CounterMetricFamily("qkv_generated_tokens", "Tokens generated since start", labels=lab)
        c.add_metric([self.model_name], s.get("generated_tokens_total", 0))
        yield c
        for name, doc, key in (
            ("qkv_engine_steps", "Engine steps that ran a forward", "steps_total"),
            ("qkv_engine_step_rows", "Sequences run, summed over steps", "step_rows_total"),
            ("qkv_engine_step_tokens", "Tokens fed to the model (prompt chunks and decode)", "step_tokens_total"),
            ("qkv_engine_step_seconds", "Wall time inside engine steps", "step_seconds_total"),
        ):
            c = CounterMetricFamily(name, doc, labels=lab)
            c.add_metric([self.model_name], s.get(key, 0))
            yield c
        c = CounterMetricFamily("qkv_prefix_cache_hits", "KV blocks reused from the prefix cache", labels=lab)
        c.add_metric([self.model_name], s.get("prefix_cache_hits", 0))
        yield c
        c = CounterMetricFamily("qkv_preemptions", "Requests preempted for lack of KV blocks", labels=lab)
        c.add_metric([self.model_name], s.get("preemptions_total", 0))
        yield c


def _gauge(name, doc, labels, values, value):
    m = GaugeMetricFamily(name, doc, labels=labels)
    m.add_metric(values, float(value))
    return m


class Metrics:
    def __init__(self, aengine: AsyncEngine, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(aengine, model_name))
        self.requests = Counter(
            "qkv_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter("qkv_prompt_tokens", "Prompt tokens received", registry=self.registry)
        self.ttft = Histogram(
            "qkv_time_to_first_token_seconds",
            "Time from request to first token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "qkv_request_latency_seconds",
            "Time from request to last token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
