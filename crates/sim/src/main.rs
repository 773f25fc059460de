//! `b25-sim`: runs all seven simulated B25 backend services until Ctrl-C / SIGTERM.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use b25_sim::{Service, SimOptions};
use clap::Parser;
use tokio::net::TcpListener;

/// Simulated B25 backend services (market-data .. dashboard on consecutive ports).
#[derive(Debug, Parser)]
#[command(name = "b25-sim", version, about)]
struct Args {
    /// Address to bind every service on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port of the first service (market-data); service i listens on base-port + i.
    #[arg(long, default_value_t = 8081)]
    base_port: u16,
    /// Latency added before every response (not /health), e.g. `5ms`, `5`, `1s`.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    latency: Duration,
    /// Answer every request (not /health) with this status and a JSON error body.
    #[arg(long, value_parser = clap::value_parser!(u16).range(200..=599))]
    error_status: Option<u16>,
    /// Do not record requests (the default, so memory stays flat in benchmarks).
    #[arg(long, conflicts_with = "record")]
    no_record: bool,
    /// Record requests (kept in memory, bounded to the last 10000 per service).
    #[arg(long)]
    record: bool,
    /// Interval between dashboard WebSocket ticker messages, e.g. `100ms`.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    ticker_interval: Duration,
}

/// Parses `<n>ms`, `<n>s` or a bare integer number of milliseconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, scale) = if let Some(ms) = s.strip_suffix("ms") {
        (ms, 1)
    } else if let Some(secs) = s.strip_suffix('s') {
        (secs, 1000)
    } else {
        (s, 1)
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .map(Duration::from_millis)
        .ok_or_else(|| format!("invalid duration {s:?} (expected e.g. 5ms, 5 or 1s)"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let options = SimOptions { ticker_interval: args.ticker_interval, record: args.record && !args.no_record };

    let mut servers = Vec::with_capacity(Service::ALL.len());
    for (i, service) in Service::ALL.into_iter().enumerate() {
        let port = u16::try_from(i).ok().and_then(|i| args.base_port.checked_add(i)).context("--base-port too high")?;
        let addr = SocketAddr::new(args.host, port);
        let listener =
            TcpListener::bind(addr).await.with_context(|| format!("binding {} on {addr}", service.name()))?;
        let server = b25_sim::start_with(service, listener, options.clone())
            .await
            .with_context(|| format!("starting {}", service.name()))?;
        server.knobs().set_latency(args.latency);
        server.knobs().set_error_status(args.error_status);
        println!("{} listening on {}", service.name(), server.url());
        servers.push(server);
    }

    wait_for_signal().await?;
    eprintln!("b25-sim: shutting down");
    for server in servers {
        server.shutdown().await;
    }
    Ok(())
}

#[cfg(unix)]
async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
async fn wait_for_signal() -> Result<()> {
    tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0ms"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("5"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_duration("5ms"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("-1ms").is_err());
    }

    #[test]
    fn cli_parses() {
        let a = Args::try_parse_from(["b25-sim"]).unwrap();
        assert_eq!(a.base_port, 8081);
        assert!(!a.record);
        let a = Args::try_parse_from(["b25-sim", "--latency", "3ms", "--record"]).unwrap();
        assert_eq!(a.latency, Duration::from_millis(3));
        assert!(a.record);
        assert!(Args::try_parse_from(["b25-sim", "--record", "--no-record"]).is_err());
        assert!(Args::try_parse_from(["b25-sim", "--error-status", "99"]).is_err());
    }
}
