//! Installing the Prometheus recorder.

use std::fmt;
use std::time::Duration;

use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};

/// Histogram buckets, in seconds: the OpenTelemetry messaging conventions'
/// advice for `messaging.*.duration`, from 5 ms to 10 s.
const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// How often histogram samples are folded in when nothing scrapes: the
/// exporter's own default.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs a Prometheus recorder as the process's global
/// [`metrics`] recorder and returns the handle that renders it (for
/// [`observability`](crate::observability)).
///
/// The recorder names series as Prometheus recommends (dots become
/// underscores, counters end in `_total` and durations in `_seconds`:
/// `watchtower.retry.retries` is scraped as
/// `watchtower_retry_retries_total`) and renders histograms as
/// true Prometheus histograms with buckets from 5 ms to 10 s (the
/// OpenTelemetry messaging advice), which, unlike summaries, add up across
/// pods. Called inside a tokio runtime, it also spawns the exporter's
/// upkeep, which folds histogram samples in every 5 s even when nothing
/// scrapes; outside one, call
/// [`run_upkeep`](PrometheusHandle::run_upkeep) now and then yourself (a
/// scrape does it too).
///
/// Call it first thing in `main`: layers, publishers and consumers register
/// their metrics when they are built, and whatever registered before any
/// recorder was installed records nowhere.
///
/// # Errors
///
/// [`InstallError::AlreadyInstalled`] if the process has a global recorder
/// already: there is one per process, and the first one stays. Keep its
/// handle, or use [`install_prometheus_with`] from the start.
pub fn install_prometheus() -> Result<PrometheusHandle, InstallError> {
    let builder = PrometheusBuilder::new()
        .with_recommended_naming(true)
        .set_buckets(&DURATION_BUCKETS)
        .map_err(InstallError::Build)?;
    install_prometheus_with(builder)
}

/// [`install_prometheus`] with a builder of your own (other buckets,
/// global labels, idle timeouts).
///
/// # Errors
///
/// As [`install_prometheus`].
pub fn install_prometheus_with(builder: PrometheusBuilder) -> Result<PrometheusHandle, InstallError> {
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| InstallError::AlreadyInstalled)?;
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let upkeep = handle.clone();
        runtime.spawn(async move {
            let mut every = tokio::time::interval(UPKEEP_INTERVAL);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                upkeep.run_upkeep();
            }
        });
    }
    Ok(handle)
}

/// Why [`install_prometheus`] installed nothing.
#[derive(Debug)]
#[non_exhaustive]
pub enum InstallError {
    /// The process has a global `metrics` recorder already.
    AlreadyInstalled,
    /// The builder's configuration was refused.
    Build(BuildError),
}

impl fmt::Display for InstallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InstallError::AlreadyInstalled => f.write_str("a metrics recorder is installed already"),
            InstallError::Build(e) => write!(f, "prometheus recorder configuration refused: {e}"),
        }
    }
}

impl std::error::Error for InstallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            InstallError::AlreadyInstalled => None,
            InstallError::Build(e) => Some(e),
        }
    }
}

impl From<InstallError> for watchtower::Error {
    fn from(e: InstallError) -> Self {
        watchtower::Error::new(watchtower::ErrorKind::Config, e.to_string()).with_source(e)
    }
}
