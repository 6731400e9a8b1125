"""Settings as frozen dataclasses: built once at startup, shared read-only afterwards."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

OnError = Literal["fail_closed", "fail_open"]
ErrorFormat = Literal["problem", "openai", "anthropic"]
CREDENTIAL_SOURCES = ("bearer", "api_key_scheme", "x-api-key", "query")
DEFAULT_SOURCES = ("bearer", "api_key_scheme", "x-api-key")
DIALECTS = ("langflow", "flowise", "openrouter", "baseten", "konpro")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


DEFAULT_LISTEN = Address("0.0.0.0", 8080)  # noqa: S104 - the proxy serves the network
DEFAULT_ADMIN_LISTEN = Address("127.0.0.1", 8081)  # management stays on this machine


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = field(default="embedded", repr=False)  # may carry a password
    data_dir: Path = Path(".keygate")
    key_prefix: str = "kg:"
    on_error: OnError = "fail_closed"
    connect_timeout: float = 1.0
    socket_timeout: float = 2.0
    cluster: bool = False  # a redis:// URL's host is a Redis Cluster seed
    username: str | None = None  # ACL user; overrides the URL's
    password: str | None = field(default=None, repr=False)  # overrides the URL's
    tls_ca_file: Path | None = None  # rediss://: the CA that signed the server's certificate
    tls_cert_file: Path | None = None  # rediss://: a client certificate (mutual TLS)
    tls_key_file: Path | None = None
    tls_check_hostname: bool = True
    # WAIT for this many replicas to have each write before acknowledging it, so that a
    # Sentinel failover cannot lose a charge the proxy already acted on (0: do not wait).
    replica_acks: int = 0
    replica_ack_timeout: float = 0.5
    # The proxy PINGs a connection idle this many seconds, so one that died unused is
    # replaced before a request needs it (0: never).
    health_check_interval: float = 15.0

    @property
    def embedded(self) -> bool:
        return self.url == "embedded"


@dataclass(frozen=True, slots=True)
class KeySettings:
    secret_prefix: str = "kg_"
    sources: tuple[str, ...] = DEFAULT_SOURCES
    query_param: str = "api_key"
    hide_credentials: bool = True
    hash_cache_size: int = 100_000


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 2.0
    read: float = 60.0
    total: float = 300.0


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    timeouts: Timeouts = field(default_factory=Timeouts)
    pool_size: int = 100
    # Caps on an answer's head (gateway/proxy/upstream_http.py says why these defaults).
    max_response_head_bytes: int = 65_536
    max_response_headers: int = 100


LlmApi = Literal["openai", "anthropic"]
UnpricedRule = Literal["refuse", "allow"]


@dataclass(frozen=True, slots=True)
class CostRule:
    """Exactly one of fixed, header, json or llm is set (validated at load).

    ``llm``: the cost is read from an LLM API's usage block (OpenAI's Chat Completions,
    Completions, Responses and Embeddings formats, or Anthropic's Messages) and priced per
    model (gateway/policies/prices.py); ``provider`` names the price catalogue's provider
    (None: found from the model name); ``unpriced``: what a request for a model with no
    price gets, refused (403 unpriced_model) or allowed and charged its reservation.
    """

    fixed: float | None = None
    header: str | None = None
    json: str | None = None
    per_unit: float = 1.0
    llm: LlmApi | None = None
    provider: str | None = None
    unpriced: UnpricedRule = "refuse"


@dataclass(frozen=True, slots=True)
class ModelPriceOverride:
    """An operator's price for one model, in credits per million tokens (as the catalogue
    states them); it wins over the catalogue. Cache prices default to the input price."""

    input_mtok: float
    output_mtok: float
    cache_read_mtok: float | None = None
    cache_write_mtok: float | None = None


@dataclass(frozen=True, slots=True)
class ResourceRule:
    """Where a request names its resource: a JSON body field, a query, a path segment, or a
    header (one a proxy in front sets, e.g. X-Keygate-Resource under forward auth)."""

    json: str | None = None
    query: str | None = None
    header: str | None = None
    path_segment: int | None = None
    max_body_bytes: int = 1_048_576


@dataclass(frozen=True, slots=True)
class RateLimit:
    requests: int
    period_seconds: float


OnExpiry = Literal["charge", "refund"]
# worst_case: admit only what fits whole under every cap; remaining: admit while any room
# is left and reserve what is left (README, "LLM APIs", says the overshoot bound).
ReserveMode = Literal["worst_case", "remaining"]
RESERVATION_LEASE_MARGIN = 30.0  # seconds a lease outlasts its route's total timeout


@dataclass(frozen=True, slots=True)
class Reservations:
    """The reservation ledger (docs/architecture.md): how long a request's reservation
    waits for its settlement, and what becomes of it when its process died first."""

    lease_seconds: float | None = None  # None: the route upstream's timeouts.total + margin
    on_expiry: OnExpiry = "charge"  # charge: the request may have cost money upstream


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    upstream: str
    path: str | None = None
    prefix: str | None = None
    methods: tuple[str, ...] = ()
    scopes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # method or "*"
    strip_prefix: bool = False
    rewrite: str | None = None
    resource: ResourceRule | None = None
    cost: CostRule | None = None
    reserve: float | None = None
    # reserve: auto (LLM routes): this request's estimate at its model's prices
    # (gateway/policies/llm_request.py); reserve_mode says what a cap does with it.
    reserve_auto: bool = False
    reserve_mode: ReserveMode = "worst_case"
    max_output_tokens: int | None = None  # the output bound when a request states none
    charge_failed: bool = False
    byok: bool = False
    rate_limit: RateLimit | None = None
    error_format: ErrorFormat = "problem"
    sources: tuple[str, ...] | None = None
    websocket: bool = False
    # The reservation lease and expiry rule; the loader fills in the `reservations`
    # section's when the route sets none (the lease then defaults to this route
    # upstream's timeouts.total + RESERVATION_LEASE_MARGIN). None: those defaults.
    lease_seconds: float | None = None
    on_expiry: OnExpiry | None = None
    # The route knowingly lets enabled dialects answer the paths they share with it
    # (otherwise such a route is a config error: it would silently lose those requests).
    yield_to_dialects: bool = False


@dataclass(frozen=True, slots=True)
class Dialect:
    enabled: bool = False  # opt-in: a dialect manages keys on the public listener
    path: str | None = None


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    per_key: bool = False
    per_key_max: int = 1000
    listen: Address | None = None  # a listener of their own for /metrics, besides admin
    on_proxy: bool = False  # also GET /metrics on the proxy listener, for metrics:read keys


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: Literal["json", "text"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"
    access: bool = True  # one line per proxied request on stdout
    access_format: Literal["auto", "json", "text"] = "auto"  # auto: text on a terminal


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """What a client connection may cost, on every listener: slow or idle clients are cut
    off, and each process holds at most so many connections (None: as many as its file
    descriptor limit leaves room for, beside upstream and Redis sockets)."""

    header_timeout: float = 10.0  # from the connection's opening or a request's first byte
    keepalive_timeout: float = 75.0  # an idle connection between two requests
    body_timeout: float = 30.0  # each window in which a request body must make progress
    min_upload_rate: int = 500  # bytes/s a request body must average over each window
    max_connections: int | None = None  # on the proxy listener, per process


@dataclass(frozen=True, slots=True)
class AdminSettings:
    max_body_bytes: int = 1_048_576
    default_workspace: str = "default"


@dataclass(frozen=True, slots=True)
class Settings:
    listen: Address = DEFAULT_LISTEN
    admin_listen: Address = DEFAULT_ADMIN_LISTEN
    # The auth listener for nginx, Traefik, Caddy and Envoy (forward auth); None: off.
    auth_listen: Address | None = None
    workers: int = 1
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish on SIGTERM
    redis: RedisSettings = field(default_factory=RedisSettings)
    keys: KeySettings = field(default_factory=KeySettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    client: ClientSettings = field(default_factory=ClientSettings)
    upstreams: dict[str, Upstream] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    dialects: dict[str, Dialect] = field(default_factory=dict)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    reservations: Reservations = field(default_factory=Reservations)
    prices: dict[str, ModelPriceOverride] = field(default_factory=dict)  # model -> price
