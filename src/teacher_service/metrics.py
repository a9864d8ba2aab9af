"""Prometheus metrics of one teacher service, in a registry of its own (several services can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "potstill_requests", "Requests answered, by endpoint, transport and outcome.",
            ["endpoint", "transport", "outcome"], registry=self.registry,
        )
        self.request_seconds = Histogram(
            "potstill_request_seconds", "Time from receiving a request to answering it.",
            ["endpoint", "transport"], registry=self.registry,
        )
        self.backend_seconds = Histogram(
            "potstill_backend_seconds", "Time a request spent queued for and running on the model.",
            ["endpoint"], registry=self.registry,
        )
        self.rejected = Counter(
            "potstill_rejected_overloaded", "Requests refused because the queue was full.",
            ["endpoint"], registry=self.registry,
        )
        self.queue_depth = Gauge(
            "potstill_queue_depth", "Requests admitted and not yet answered.", registry=self.registry
        )
        self.tokens_scored = Counter(
            "potstill_tokens_scored", "Completion positions scored.", registry=self.registry
        )
        self.tokens_generated = Counter(
            "potstill_tokens_generated", "Tokens generated across all samples.", registry=self.registry
        )
        self.pass_sequences = Histogram(
            "potstill_forward_pass_sequences", "Sequences (rows) in one forward pass of the model, by kind.",
            ["kind"], buckets=[2**i for i in range(11)], registry=self.registry,
        )
        self.pass_tokens = Histogram(
            "potstill_forward_pass_tokens", "Padded tokens (rows x width) in one forward pass, by kind.",
            ["kind"], buckets=[2**i for i in range(4, 18)], registry=self.registry,
        )
        self.weight_pushes = Counter(
            "potstill_weight_pushes", "Weight pushes, by outcome (loaded or refused).", ["outcome"], registry=self.registry
        )
        self.model_version = Gauge("potstill_model_version", "Version of the weights served now.", registry=self.registry)

    def observe_pass(self, kind: str, sequences: int, tokens: int) -> None:
        """One forward pass (or, for generate, one decoding loop) over `sequences` rows of `tokens` in all."""
        self.pass_sequences.labels(kind).observe(sequences)
        self.pass_tokens.labels(kind).observe(tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
