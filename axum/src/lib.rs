//! Observability routes for [axum]: Prometheus `/metrics`, liveness
//! `/health` and readiness `/ready`, mounted with one line.
//!
//! ```
//! use axum::Router;
//! use watchtower_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
//! use watchtower_layers::health::HealthView;
//! use watchtower_memory::MemoryBroker;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // First: the layers register their metrics when they are built.
//! let prometheus = watchtower_axum::install_prometheus()?;
//!
//! let broker = MemoryBroker::new();
//! let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::new().name("orders"));
//! let health = HealthView::new()
//!     .transport("events", broker.clone())
//!     .breaker("orders", breaker.handle());
//!
//! let app: Router = Router::new()
//!     // .route("/orders", post(place_order)) ...
//!     .merge(watchtower_axum::observability(health, prometheus));
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! # Routes
//!
//! | route | answers | for |
//! |---|---|---|
//! | `GET /metrics` | the Prometheus text exposition of the installed recorder | a Prometheus scrape |
//! | `GET /health` | `200 {"status":"up"}` | a Kubernetes **liveness** probe |
//! | `GET /ready` | `200` or `503` with the [`HealthReport`](watchtower_layers::health::HealthReport) as JSON | a Kubernetes **readiness** probe |
//!
//! **Liveness** says whether the process can make progress: the answer
//! comes from the same runtime that runs the application, so a process
//! whose runtime is stuck does not answer and the kubelet restarts it. It
//! asks no broker: an outage of the broker is not cured by restarting
//! every pod that talks to it, and a liveness check that followed the
//! broker would do exactly that.
//!
//! **Readiness** says whether the pod should get traffic: `503 Service
//! Unavailable` while any transport is [`Down`](watchtower::health::Status::Down)
//! or any breaker is open or forced open (the report's status is `down`),
//! `200` otherwise, including while something is only `degraded` (a
//! half-open breaker, a full queue, dead letters held in memory: the pod
//! still works). The kubelet then takes the pod out of the Service's
//! endpoints until it recovers, without restarting it. The body is the
//! whole report either way, for the operator who asks why. A transport
//! that does not answer within the view's
//! [`check_timeout`](watchtower_layers::health::HealthView::check_timeout)
//! (5 s by default, below the probe's default 10 s period) counts as down.
//!
//! A matching probe configuration:
//!
//! ```yaml
//! livenessProbe:
//!   httpGet: { path: /health, port: 8080 }
//! readinessProbe:
//!   httpGet: { path: /ready, port: 8080 }
//!   timeoutSeconds: 6   # above the health view's check timeout
//! ```
//!
//! # Metrics
//!
//! The layers of `watchtower-layers` and the core's transports and
//! consumer runtime record through the [`metrics`] facade (with their
//! features `metrics`, which this crate turns on); [`install_prometheus`] installs
//! the Prometheus recorder of `metrics-exporter-prometheus` as the global
//! one and returns the [`PrometheusHandle`] that `/metrics` renders. The
//! facade is what Rust services record through; a service exporting
//! OpenTelemetry instead installs a `metrics`-to-OpenTelemetry recorder and
//! mounts [`Observability`] without metrics.
//!
//! Install the recorder before building the layers and publishers: they
//! register their metrics once, when they are built, and what registers
//! before any recorder is installed records nowhere.
//!
//! [`PrometheusHandle`]: metrics_exporter_prometheus::PrometheusHandle
#![forbid(unsafe_code)]
// Library code never panics on input it does not control.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod install;
mod routes;

pub use install::{InstallError, install_prometheus, install_prometheus_with};
pub use routes::{Observability, observability};
