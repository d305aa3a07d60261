//! The routes and their handlers.

use std::fmt;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use watchtower::health::Status;
use watchtower_layers::health::HealthView;

/// The content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `/metrics`, `/health` and `/ready` as a router to
/// [`merge`](Router::merge) into an application's: see the
/// [crate docs](crate) for what each answers.
///
/// The router carries no state of its own, so it merges into a router of
/// any state type.
///
/// ```
/// use axum::Router;
/// use metrics_exporter_prometheus::PrometheusBuilder;
/// use watchtower_layers::health::HealthView;
///
/// let prometheus = PrometheusBuilder::new().build_recorder().handle();
/// let app: Router = Router::new().merge(watchtower_axum::observability(HealthView::new(), prometheus));
/// ```
pub fn observability<S>(health: HealthView, prometheus: PrometheusHandle) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Observability::new(health).metrics(prometheus).into_router()
}

/// Builds the observability routes, for an application that wants other
/// paths or no `/metrics` (one that exports OpenTelemetry instead).
///
/// ```
/// use axum::Router;
/// use watchtower_axum::Observability;
/// use watchtower_layers::health::HealthView;
///
/// let routes = Observability::new(HealthView::new())
///     .liveness_path("/livez")
///     .readiness_path("/readyz")
///     .into_router();
/// let app: Router = Router::new().nest("/internal", routes);
/// ```
#[derive(Clone)]
pub struct Observability {
    health: HealthView,
    prometheus: Option<PrometheusHandle>,
    metrics_path: String,
    liveness_path: String,
    readiness_path: String,
}

impl Observability {
    /// Liveness and readiness from `health`, without `/metrics` until
    /// [`metrics`](Self::metrics) is given a handle.
    pub fn new(health: HealthView) -> Self {
        Observability {
            health,
            prometheus: None,
            metrics_path: "/metrics".to_owned(),
            liveness_path: "/health".to_owned(),
            readiness_path: "/ready".to_owned(),
        }
    }

    /// Serves the Prometheus exposition rendered by `prometheus` (from
    /// [`install_prometheus`](crate::install_prometheus)).
    pub fn metrics(mut self, prometheus: PrometheusHandle) -> Self {
        self.prometheus = Some(prometheus);
        self
    }

    /// Where the exposition is served. Default: `/metrics`, where
    /// Prometheus scrapes unless told otherwise.
    pub fn metrics_path(mut self, path: impl Into<String>) -> Self {
        self.metrics_path = path.into();
        self
    }

    /// Where the liveness check is served. Default: `/health`.
    pub fn liveness_path(mut self, path: impl Into<String>) -> Self {
        self.liveness_path = path.into();
        self
    }

    /// Where the readiness check is served. Default: `/ready`.
    pub fn readiness_path(mut self, path: impl Into<String>) -> Self {
        self.readiness_path = path.into();
        self
    }

    /// The routes.
    ///
    /// # Panics
    ///
    /// As [`Router::route`] does: if a path is empty, does not start with
    /// `/`, or two of them are the same.
    pub fn into_router<S>(self) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let health = self.health;
        let mut router = Router::new()
            .route(&self.liveness_path, get(live))
            .route(&self.readiness_path, get(move || ready(health.clone())));
        if let Some(prometheus) = self.prometheus {
            router = router.route(&self.metrics_path, get(move || metrics(prometheus.clone())));
        }
        router
    }
}

impl fmt::Debug for Observability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observability")
            .field("health", &self.health)
            .field("metrics", &self.prometheus.is_some())
            .field("metrics_path", &self.metrics_path)
            .field("liveness_path", &self.liveness_path)
            .field("readiness_path", &self.readiness_path)
            .finish()
    }
}

/// The Prometheus text exposition.
async fn metrics(prometheus: PrometheusHandle) -> Response {
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], prometheus.render()).into_response()
}

/// Liveness: answering at all is the check.
async fn live() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], r#"{"status":"up"}"#).into_response()
}

/// Readiness: 503 while the report is down, the report as JSON either way.
async fn ready(health: HealthView) -> Response {
    let report = health.report().await;
    let code = if report.status == Status::Down {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, axum::Json(report)).into_response()
}
