"""The optional ``[metrics]`` HTTP service: ``/metrics`` for Prometheus, ``/healthz`` for load balancers.

Plain HTTP/1.1 by ``twisted.web``, on the endpoint ``[metrics] endpoint`` names (keep it on loopback or
a management network: it has no TLS and no authentication).

``/metrics`` is the registry in prometheus_client's text format (or OpenMetrics, if the scraper asks
for it), produced in the reactor thread. ``prometheus_client.twisted.MetricsResource`` runs the same
encoder in the reactor's thread pool, but it imports the global reactor at import time, and for
popproxy's few dozen series (with workers, a few small files per worker) a thread costs more than it
saves.

``/healthz`` answers 200 while at least one listener accepts clients, 503 otherwise (stopping,
draining, or no worker ready), so that a load balancer stops sending new connections first.

The port is bound in ``privilegedStartService``, like the POP3 listeners, before twistd drops
privileges; the owner (``ProxyService`` or ``WorkerPool``) starts and stops it itself so that
``/healthz`` keeps answering 503 while sessions drain.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.web import http
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from zope.interface import Interface

__all__ = ["HealthResource", "IHealth", "MetricsResource", "metrics_service", "metrics_site"]


class IHealth(Interface):
    """What ``/healthz`` reports on."""

    def serving() -> bool:
        """True while at least one listener accepts new clients (with workers: a worker is ready)."""


class HealthResource(Resource):
    """``/healthz``: 200 ``ok`` while ``health.serving()``, 503 ``unavailable`` otherwise (RFC 9110 §15.6.4:
    503 says the condition is temporary)."""

    isLeaf = True

    def __init__(self, health: IHealth) -> None:
        super().__init__()
        self._health = health

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self._health.serving():
            return b"ok\n"
        request.setResponseCode(503)
        return b"unavailable\n"

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)


class MetricsResource(Resource):
    """``/metrics``: everything ``registry`` collects, in the format the scraper's ``Accept`` asks for
    (https://prometheus.io/docs/instrumenting/exposition_formats/)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept is not None else "")
        output = encoder(self._registry)
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        request.setHeader(b"cache-control", b"no-store")
        return output

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)


class _Root(Resource):
    """``/metrics`` and ``/healthz``; 404 for anything else (``twisted.web.pages.notFound``, not the
    deprecated default ``NoResource``)."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return notFound()


class _QuietSite(Site):
    """No access-log line per request: a scraper asks every few seconds."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def metrics_site(registry: CollectorRegistry, health: IHealth) -> Site:
    """The resource tree: ``/metrics`` from ``registry``, ``/healthz`` from ``health``; anything else is 404."""
    root = _Root()
    root.putChild(b"metrics", MetricsResource(registry))
    root.putChild(b"healthz", HealthResource(health))
    return _QuietSite(root)


def metrics_service(endpoint: str, registry: CollectorRegistry, health: IHealth, reactor: Any) -> StreamServerEndpointService:
    """The service that serves ``metrics_site`` on ``endpoint`` (a Twisted server endpoint string). Its
    ``privilegedStartService`` binds the port, and raises if it cannot (as the listeners do)."""
    service = StreamServerEndpointService(serverFromString(reactor, endpoint), metrics_site(registry, health))
    service._raiseSynchronously = True
    service.setName("metrics")
    return service
