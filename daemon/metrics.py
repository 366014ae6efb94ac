"""Prometheus metrics, served on `metrics.listen` when set (off by default)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from daemon.errors import ConfigError


class Metrics:
    """The daemon's metrics in a registry of their own (tests can make as many as they like)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.last_success = Gauge("groupgate_sync_last_success_timestamp_seconds",
                                  "Unix time of the last successful sync", registry=r)
        self.duration = Histogram("groupgate_sync_duration_seconds", "Duration of sync runs",
                                  buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300), registry=r)
        self.tokens = Gauge("groupgate_tokens", "Tokens by status", ["status"], registry=r)
        self.changes = Counter("groupgate_token_changes_total", "Applied token status changes",
                               ["kind"], registry=r)
        self.refusals = Counter("groupgate_sync_refusals_total",
                                "Sync plans refused by the safety brake", registry=r)
        self.directory_errors = Counter("groupgate_directory_errors_total",
                                        "Sync runs that failed to read the directory",
                                        registry=r)
        self.job_failures = Counter("groupgate_job_failures_total", "Failed scheduled jobs",
                                    ["job"], registry=r)
        self.leader = Gauge("groupgate_leader", "1 when this instance runs the scheduled jobs",
                            registry=r)
        self._server: Any = None

    def serve(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            self._server, _thread = start_http_server(int(port), addr=host,
                                                      registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics.listen: cannot listen on {listen}: "
                              f"{exc.strerror}") from None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
