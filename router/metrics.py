"""The gateway's Prometheus metrics: every name ``/metrics`` serves, defined once.

Names carry their unit (``_seconds``; counters get ``_total`` from prometheus_client), and
``deploy/grafana-dashboard.json`` queries exactly these names (a test checks each one
against a live gateway's ``/metrics``). Label values that are known up front (admission
queue classes, migration outcomes) are created at start, so their series exist at 0 before
the first event and dashboards show a flat line rather than "no data".

Recording costs the request path one counter/histogram update per event; the dashboard
(``router.dashboard``) reads these same objects once a second instead of keeping counts of
its own.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets (seconds): fine below 100 ms, where TTFTs of cached prompts and
# inter-token gaps live, and out to a minute for long prefills.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0,
    5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
)
TOKEN_GAP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.5, 1.0, 2.5,
)
DECISION_BUCKETS = (1e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 1e-3, 1e-2)
# Stop-and-copy downtime of a live migration: tens of milliseconds when healthy.
DOWNTIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

ADMISSION_CLASSES = ("short", "long")  # LAPS: by uncached prefill tokens
# Why LAPS releases a queued request and why the rebalancer moves one (router.admission).
ADMISSION_RELEASE_REASONS = ("room", "aged")
ADMISSION_MOVE_REASONS = ("rebalance_ttft", "rebalance_wait")
MIGRATION_OUTCOMES = ("committed", "aborted", "failed")
# Why the gateway ordered a live migration (router.migrations): by hand, off a drained
# replica, off a replica below the freeness threshold (Llumnix rebalancing).
MIGRATION_REASONS = ("admin", "drain", "freeness")


class GatewayMetrics:
    """One gateway replica's metrics, in a registry of their own (one per ``Gateway``)."""

    def __init__(self) -> None:
        reg = self.registry = CollectorRegistry()
        # -- requests ------------------------------------------------------------------------
        self.requests = Counter("llmfleet_requests", "Requests by endpoint and status code",
                                ["endpoint", "status"], registry=reg)
        self.latency = Histogram("llmfleet_request_duration_seconds",
                                 "Gateway request duration, arrival to last byte", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=reg)
        self.ttft = Histogram("llmfleet_time_to_first_token_seconds",
                              "Time to first token seen by the gateway (streaming)",
                              buckets=LATENCY_BUCKETS, registry=reg)
        self.itl = Histogram("llmfleet_inter_token_latency_seconds",
                             "Gap between successive streamed chunks after the first token",
                             buckets=TOKEN_GAP_BUCKETS, registry=reg)
        self.stream_errors = Counter("llmfleet_stream_errors",
                                     "Streams whose replica failed mid-stream", registry=reg)
        self.retries = Counter("llmfleet_upstream_retries",
                               "Requests re-sent to another replica (failover)", registry=reg)
        # -- routing -------------------------------------------------------------------------
        self.decisions = Counter("llmfleet_routing_decisions", "Routing decisions by reason",
                                 ["policy", "reason"], registry=reg)
        self.decision_us = Histogram("llmfleet_routing_decision_seconds",
                                     "Time spent in the routing policy per decision",
                                     buckets=DECISION_BUCKETS, registry=reg)
        self.instances = Gauge("llmfleet_instances", "Instances by health",
                               ["state"], registry=reg)
        self.kv_batches = Counter("llmfleet_kv_event_batches", "KV event batches applied",
                                  registry=reg)
        # -- admission queues (LAPS) ----------------------------------------------------------
        self.queue_length = Gauge("llmfleet_admission_queued_requests",
                                  "Requests waiting in the gateway's admission queues",
                                  ["queue"], registry=reg)
        self.queue_wait = Histogram("llmfleet_admission_queue_wait_seconds",
                                    "Time a request waited in an admission queue",
                                    ["queue"], buckets=LATENCY_BUCKETS, registry=reg)
        self.admission_releases = Counter("llmfleet_admission_releases",
                                          "Requests released from admission queues by reason",
                                          ["reason"], registry=reg)
        self.admission_moves = Counter("llmfleet_admission_moves",
                                       "Queued requests moved to another replica by reason",
                                       ["reason"], registry=reg)
        # -- live migration --------------------------------------------------------------------
        self.migrations = Counter("llmfleet_migrations",
                                  "Live migrations by outcome and by why they were ordered",
                                  ["outcome", "reason"], registry=reg)
        self.migrations_in_flight = Gauge("llmfleet_migrations_in_flight",
                                          "Live migrations under way", registry=reg)
        self.migration_downtime = Histogram("llmfleet_migration_downtime_seconds",
                                            "Stop-and-copy downtime of committed migrations",
                                            buckets=DOWNTIME_BUCKETS, registry=reg)
        self.migration_duration = Histogram("llmfleet_migration_duration_seconds",
                                            "Whole migration, reserve to commit or abort",
                                            buckets=LATENCY_BUCKETS, registry=reg)
        # -- the dashboard itself -------------------------------------------------------------
        self.dashboard_viewers = Gauge("llmfleet_dashboard_viewers",
                                       "Dashboard live streams open on this gateway",
                                       registry=reg)
        for name in ADMISSION_CLASSES:
            self.queue_length.labels(queue=name).set(0)
            self.queue_wait.labels(queue=name)
        for reason in ADMISSION_RELEASE_REASONS:
            self.admission_releases.labels(reason=reason)
        for reason in ADMISSION_MOVE_REASONS:
            self.admission_moves.labels(reason=reason)
        for outcome in MIGRATION_OUTCOMES:
            for reason in MIGRATION_REASONS:
                self.migrations.labels(outcome=outcome, reason=reason)
        for state in ("healthy", "unhealthy"):
            self.instances.labels(state=state).set(0)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric above."""
        return generate_latest(self.registry)
