//! `b25-gateway`: command line only. `run` (the default), `check`, `demo`, in the manner of
//! `nginx -t` for `check`.

#![forbid(unsafe_code)]

use anyhow::Context;
use b25_gateway::config::{self, Config};
use b25_gateway::server;
use clap::{Parser, Subcommand};

mod demo;

/// jemalloc: the same CPU per request as glibc's allocator where a request allocates nothing
/// (a proxied GET), 5–8 % less on order entry, where each request allocates its body and
/// idempotency record, and a smaller heap there (bench/EXPERIMENTS.md, "Allocators again").
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit status for an invalid configuration (as `nginx -t` uses non-zero; 2 = usage/config).
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(name = "b25-gateway", version, about = "API gateway for the B25 trading system")]
struct Cli {
    /// Config file (YAML).
    #[arg(long, short, global = true, env = "B25_GATEWAY_CONFIG", default_value = "config/gateway.yaml")]
    config: PathBuf,
    /// Config file for `run`, the default subcommand: `b25-gateway config/gateway.yaml`.
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,
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
    /// print ready-to-paste curl commands with demo credentials.
    Demo {
        /// Config file (same as --config).
        file: Option<PathBuf>,
    },
    /// Print the SHA-256 to put in `auth.api_keys.keys[].sha256` for a new API key. The key is
    /// read from standard input (so it stays out of shell history and `ps`), or generated.
    HashKey {
        /// Generate a random key, print it and its hash.
        #[arg(long)]
        generate: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let or_default = |f: Option<PathBuf>| f.unwrap_or_else(|| cli.config.clone());
    match cli.command.unwrap_or_else(|| Command::Run { file: cli.file.clone() }) {
        Command::Check { file } => check(&or_default(file)),
        Command::Run { file } => serve(&or_default(file), false),
        Command::Demo { file } => serve(&or_default(file), true),
        Command::HashKey { generate } => hash_key(generate),
    }
}

fn hash_key(generate: bool) -> ExitCode {
    let key = if generate {
        let mut b = [0u8; 24];
        if aws_lc_rs::rand::fill(&mut b).is_err() {
            eprintln!("no randomness available");
            return ExitCode::FAILURE;
        }
        let k: String = b.iter().map(|x| format!("{x:02x}")).collect();
        println!("key:    b25_{k}");
        format!("b25_{k}")
    } else {
        let mut line = String::new();
        if std::io::stdin().read_line(&mut line).is_err() || line.trim().is_empty() {
            eprintln!("usage: echo -n KEY | b25-gateway hash-key   (or: b25-gateway hash-key --generate)");
            return ExitCode::from(EXIT_CONFIG);
        }
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    let hash = b25_gateway::auth::apikey::hash_hex(&key);
    if generate {
        println!("sha256: {hash}");
    } else {
        println!("{hash}");
    }
    ExitCode::SUCCESS
}

fn load(path: &Path, demo: bool) -> Result<Config, ExitCode> {
    let result = if demo { config::load_with(path, &demo::env) } else { config::load(path) };
    result.map_err(|e| {
        eprint!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn check(path: &Path) -> ExitCode {
    match load(path, false) {
        Ok(c) => {
            // Deep checks too: PEM/JWKS files, CORS origins, the role hierarchy.
            if let Err(errors) = b25_gateway::snapshot::Snapshot::build(c.clone()) {
                eprint!("{}", config::ConfigErrors { file: path.display().to_string(), errors });
                return ExitCode::from(EXIT_CONFIG);
            }
            print!("{}", c.summary());
            for w in c.runtime_problems() {
                println!("warning: {}: {w} (`run` refuses this)", path.display());
            }
            println!("{}: configuration OK", path.display());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn serve(path: &Path, demo: bool) -> ExitCode {
    let mut config = match load(path, demo) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if demo {
        demo::add_api_key(&mut config);
    }
    let _guard = b25_gateway::observe::init_logging(&config.logging);
    // The control runtime: accept loop, admin listener, health checks, reloads, Redis. Client
    // connections are served on the worker threads (`server.workers`).
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config, path, demo)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if e.downcast_ref::<server::StartError>().is_some_and(|s| matches!(s, server::StartError::Config(_))) =>
        {
            eprint!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "gateway failed");
            eprintln!("b25-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, path: &Path, demo: bool) -> anyhow::Result<()> {
    let _sims = if demo { start_sims(&config).await? } else { Vec::new() };
    let handle = server::start(config.clone(), &path.display().to_string()).await?;
    if demo {
        // A reload reads the file as the demo did at start: its secrets and API key.
        handle.set_loader(Box::new(|p| {
            let mut c = config::load_with(p, &demo::env)?;
            demo::add_api_key(&mut c);
            Ok(c)
        }));
        handle.ready().await;
        demo::print(&config, handle.addr(), handle.admin_addr());
    }
    // SIGHUP reloads; SIGTERM / SIGINT drain and stop.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).expect("SIGHUP handler");
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                let _ = handle.reload().await;
            }
        }
    }
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
        for inst in &svc.instances {
            let url = inst.url();
            let uri: http::Uri = url.parse().with_context(|| format!("demo: {url}"))?;
            let host = uri.host().unwrap_or("127.0.0.1").trim_matches(['[', ']']);
            let host = if host == "localhost" { "127.0.0.1" } else { host };
            let addr: SocketAddr = format!("{host}:{}", uri.port_u16().unwrap_or(80))
                .parse()
                .with_context(|| format!("demo: instance {url} must be an IP address"))?;
            anyhow::ensure!(addr.ip().is_loopback(), "demo: instance {url} is not on loopback");
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("demo: cannot start simulated {name} on {addr}"))?;
            let opts = b25_sim::SimOptions { record: false, ..Default::default() };
            sims.push(b25_sim::start_with(service, listener, opts).await?);
        }
    }
    Ok(sims)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
