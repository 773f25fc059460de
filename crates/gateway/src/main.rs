//! `b25-gateway`: command line only. `run` (the default), `check`, `demo`, in the manner of
//! `nginx -t` for `check`.

#![forbid(unsafe_code)]

use anyhow::Context;
use b25_gateway::config::{self, Config};
use b25_gateway::server;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit status for an invalid configuration (as `nginx -t` uses non-zero; 2 = usage/config).
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "b25-gateway",
    version,
    about = "API gateway for the B25 trading system"
)]
struct Cli {
    /// Config file (YAML).
    #[arg(
        long,
        short,
        global = true,
        env = "B25_GATEWAY_CONFIG",
        default_value = "config/gateway.yaml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run {
        /// Config file (same as --config).
        file: Option<PathBuf>,
    },
    /// Validate the config: print a summary and exit 0, or list every error and exit 2.
    Check {
        /// Config file (same as --config), as in `b25-gateway check config/gateway.yaml`.
        file: Option<PathBuf>,
    },
    /// Start simulated B25 services on the config's instance addresses plus the gateway, and
    /// print ready-to-paste curl commands.
    Demo {
        /// Config file (same as --config).
        file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let or_default = |f: Option<PathBuf>| f.unwrap_or_else(|| cli.config.clone());
    match cli.command.unwrap_or(Command::Run { file: None }) {
        Command::Check { file } => check(&or_default(file)),
        Command::Run { file } => serve(&or_default(file), false),
        Command::Demo { file } => serve(&or_default(file), true),
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    config::load(path).map_err(|e| {
        eprint!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn check(path: &Path) -> ExitCode {
    match load(path) {
        Ok(c) => {
            print!("{}", c.summary());
            println!("{}: configuration OK", path.display());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn serve(path: &Path, demo: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let _guard = b25_gateway::observe::init_logging(&config.logging);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config, path, demo)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "gateway failed");
            eprintln!("b25-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, path: &Path, demo: bool) -> anyhow::Result<()> {
    let _sims = if demo {
        start_sims(&config).await?
    } else {
        Vec::new()
    };
    let handle = server::start(config.clone(), &path.display().to_string()).await?;
    if demo {
        handle.ready().await;
        print_demo(&config, handle.addr(), handle.admin_addr());
    }
    shutdown_signal().await;
    tracing::info!("shutdown signal received");
    handle.shutdown();
    handle.wait().await;
    Ok(())
}

/// Starts one simulated service on every loopback instance address of the config.
async fn start_sims(config: &Config) -> anyhow::Result<Vec<b25_sim::SimServer>> {
    let mut sims = Vec::new();
    for (name, svc) in &config.services {
        let Some(service) = b25_sim::Service::from_name(name) else {
            anyhow::bail!("demo: service {name:?} is not a B25 service the simulator knows");
        };
        for url in &svc.instances {
            let uri: http::Uri = url.parse().with_context(|| format!("demo: {url}"))?;
            let host = uri.host().unwrap_or("127.0.0.1").trim_matches(['[', ']']);
            let host = if host == "localhost" {
                "127.0.0.1"
            } else {
                host
            };
            let addr: SocketAddr = format!("{host}:{}", uri.port_u16().unwrap_or(80))
                .parse()
                .with_context(|| format!("demo: instance {url} must be an IP address"))?;
            anyhow::ensure!(
                addr.ip().is_loopback(),
                "demo: instance {url} is not on loopback"
            );
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("demo: cannot start simulated {name} on {addr}"))?;
            let opts = b25_sim::SimOptions {
                record: false,
                ..Default::default()
            };
            sims.push(b25_sim::start_with(service, listener, opts).await?);
        }
    }
    Ok(sims)
}

fn print_demo(config: &Config, addr: SocketAddr, admin: Option<SocketAddr>) {
    let host = if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    };
    let base = format!(
        "{}://{host}",
        if config.server.tls.is_some() {
            "https"
        } else {
            "http"
        }
    );
    println!(
        "\nb25-gateway demo is ready: {} simulated services behind {base}\n",
        config.services.len()
    );
    println!("Try:");
    println!("  curl -s {base}/health");
    println!("  curl -s {base}/api/v1/market/ticker/BTCUSDT");
    println!("  curl -s {base}/api/v1/market/orderbook/ETHUSDT");
    println!(
        "  curl -s -X POST {base}/api/v1/orders -H 'content-type: application/json' \\\n       -d '{{\"symbol\":\"BTCUSDT\",\"side\":\"buy\",\"quantity\":0.5,\"price\":65000}}'"
    );
    println!("  curl -s {base}/api/v1/orders/ord-1");
    println!("  curl -s -X DELETE {base}/api/v1/orders/ord-1");
    println!("  curl -s {base}/api/v1/account/balance");
    if let Some(a) = admin {
        println!("  curl -s http://{a}/metrics");
    }
    println!("\nCtrl-C stops it.\n");
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
