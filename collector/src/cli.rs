//! The command line: every flag has an environment fallback (`TOLLGATE_*`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};

use crate::api::report_limit::ReportLimiter;
use crate::api::{app, AppState};
use crate::auth::Role;
use crate::config::Limits;
use crate::db::{OrgRecord, Storage};
use crate::ingest::writer::Writer;
use crate::metrics::Metrics;
use crate::pricing::PolicyFile;
use crate::reports::{ReportCtx, ReportError, ReportQuery};

/// Tollgate's usage collector.
#[derive(Parser)]
#[command(name = "tollgate-collector", version, about)]
pub struct Cli {
    /// Database: `postgres://…`, or an SQLite file (`sqlite://PATH` or a path), created on
    /// first use.
    #[arg(
        long,
        env = "TOLLGATE_DATABASE",
        default_value = "sqlite://tollgate.db",
        global = true,
        hide_env_values = true
    )]
    pub database: String,
    /// Database connections per process.
    #[arg(
        long,
        env = "TOLLGATE_DB_CONNECTIONS",
        default_value_t = 8,
        global = true
    )]
    pub db_connections: u32,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Run the HTTP service (migrates first).
    Serve(ServeArgs),
    /// Apply the database migrations and exit.
    Migrate,
    /// Validate a policy file (the edges' policy plus `pricing`) and exit.
    Validate {
        /// The policy file.
        #[arg(long, env = "TOLLGATE_POLICY")]
        policy: PathBuf,
    },
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage orgs.
    #[command(subcommand)]
    Orgs(OrgsCommand),
    /// Run a report, as `GET /v1/reports/<NAME>` would (every org unless `--org`).
    Report(Box<ReportArgs>),
}

/// `serve` flags.
#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long, env = "TOLLGATE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The policy file with plans and prices (validated at start).
    #[arg(long, env = "TOLLGATE_POLICY")]
    pub policy: Option<PathBuf>,
    /// Raw-event retention in days.
    #[arg(long, env = "TOLLGATE_RETENTION_DAYS", default_value_t = 30)]
    pub retention_days: u64,
    /// Minute-rollup retention in days.
    #[arg(long, env = "TOLLGATE_MINUTE_ROLLUP_DAYS", default_value_t = 14)]
    pub minute_rollup_days: u64,
    /// Largest request body in bytes.
    #[arg(long, env = "TOLLGATE_MAX_BODY_BYTES", default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Events queued for commit before batches get 503.
    #[arg(long, env = "TOLLGATE_MAX_QUEUED_EVENTS", default_value_t = 200_000)]
    pub max_queued_events: usize,
    /// Committer tasks (default: 1 on SQLite, 4 on PostgreSQL).
    #[arg(long, env = "TOLLGATE_COMMITTERS")]
    pub committers: Option<usize>,
}

/// `report` flags: the report's name, its parameters (passed to it as text, as a query string
/// would be; the report checks them) and the output format.
#[derive(Args, Clone, Debug)]
pub struct ReportArgs {
    /// The report.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(crate::reports::NAMES))]
    pub name: String,
    /// Only this org (default: every org).
    #[arg(long)]
    pub org: Option<String>,
    /// Start, RFC 3339 (rounded down to the hour). Exclusive with `--days`.
    #[arg(long)]
    pub from: Option<String>,
    /// End (exclusive), RFC 3339 (rounded up to the hour); default now.
    #[arg(long)]
    pub to: Option<String>,
    /// The last 1–90 days up to `--to` (default 7 when neither `--from` nor `--days`).
    #[arg(long)]
    pub days: Option<String>,
    /// Rows (or series) to return, 1–1000.
    #[arg(long)]
    pub limit: Option<String>,
    /// Comma-separated: `org`, `user`, `route`, `method`, `status_class`, `decision`.
    #[arg(long)]
    pub group_by: Option<String>,
    /// Time-series bucket: `minute`, `hour` or `day`.
    #[arg(long)]
    pub interval: Option<String>,
    /// `top`: `users`, `orgs`, `endpoints` or `routes`.
    #[arg(long)]
    pub dimension: Option<String>,
    /// `top`: rank by `calls` or `cost`.
    #[arg(long)]
    pub by: Option<String>,
    /// `export`: `events` or `rollups`.
    #[arg(long)]
    pub source: Option<String>,
    /// `billing`: the month, `YYYY-MM` (default the current one).
    #[arg(long)]
    pub month: Option<String>,
    /// Output: an aligned table, the API's JSON document (pretty-printed) or CSV.
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
    /// The policy file with plans and prices (for `quotas` and `billing`).
    #[arg(long, env = "TOLLGATE_POLICY")]
    pub policy: Option<PathBuf>,
}

/// How `report` prints.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportFormat {
    /// Columns padded for a terminal.
    Table,
    /// The JSON document the HTTP API returns.
    Json,
    /// CSV with a header row.
    Csv,
}

impl ReportArgs {
    /// The report parameters given on the command line (the rest `None`).
    pub fn query(&self) -> ReportQuery {
        ReportQuery {
            org: self.org.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            days: self.days.clone(),
            limit: self.limit.clone(),
            group_by: self.group_by.clone(),
            // The CLI renders the report itself (`--format`).
            format: None,
            interval: self.interval.clone(),
            dimension: self.dimension.clone(),
            by: self.by.clone(),
            source: self.source.clone(),
            month: self.month.clone(),
        }
    }
}

/// `keys` subcommands.
#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key; its secret is printed once, alone on stdout.
    Create {
        /// Org (`*`: every org, for admin and ingest keys).
        #[arg(long)]
        org: String,
        /// admin, reader or ingest.
        #[arg(long)]
        role: Role,
        /// A label.
        #[arg(long)]
        name: Option<String>,
    },
    /// List keys (never their secrets).
    List {
        /// Only this org's.
        #[arg(long)]
        org: Option<String>,
    },
    /// Revoke a key by id.
    Revoke {
        /// The key's id (`key_…`).
        id: String,
    },
}

/// `orgs` subcommands.
#[derive(Subcommand)]
pub enum OrgsCommand {
    /// Create an org.
    Create {
        /// Id, as events name it.
        id: String,
        /// Display name (default: the id).
        #[arg(long)]
        name: Option<String>,
        /// Its plan.
        #[arg(long)]
        plan: Option<String>,
    },
    /// List orgs.
    List,
}

impl clap::ValueEnum for Role {
    fn value_variants<'a>() -> &'a [Self] {
        &[Role::Admin, Role::Reader, Role::Ingest]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_async(cli))
}

/// Reads and validates a policy file.
pub fn load_policy(path: &Path) -> Result<PolicyFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read policy file {}", path.display()))?;
    PolicyFile::from_json(&text).with_context(|| format!("policy file {}", path.display()))
}

async fn connect(cli: &Cli) -> Result<Storage> {
    let url = SecretString::from(cli.database.clone());
    let storage = Storage::connect(url.expose_secret(), cli.db_connections)
        .await
        .context("cannot open the database (check --database / TOLLGATE_DATABASE)")?;
    storage
        .migrate()
        .await
        .context("database migration failed")?;
    Ok(storage)
}

async fn run_async(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Validate { policy } => {
            let file = load_policy(policy)?;
            println!(
                "{}: valid ({} priced plans, policy version {})",
                policy.display(),
                file.pricing.len(),
                file.policy.version()
            );
            Ok(())
        }
        Command::Migrate => {
            let storage = connect(&cli).await?;
            println!("migrated ({})", storage.engine());
            Ok(())
        }
        Command::Serve(args) => serve(connect(&cli).await?, args.clone()).await,
        Command::Keys(cmd) => {
            let storage = connect(&cli).await?;
            keys(&storage, cmd).await
        }
        Command::Orgs(cmd) => {
            let storage = connect(&cli).await?;
            orgs(&storage, cmd).await
        }
        Command::Report(args) => {
            // Read the policy first: a bad file fails before the database is touched.
            let policy = args.policy.as_deref().map(load_policy).transpose()?;
            let storage = connect(&cli).await?;
            let result = report(&storage, policy.as_ref(), args).await;
            storage.close().await;
            result
        }
    }
}

async fn keys(storage: &Storage, cmd: &KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Create { org, role, name } => {
            let (record, new) = crate::api::create_key_record(storage, org, *role, name.clone())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            eprintln!(
                "created {} (org {}, role {}); the key below is shown only now:",
                record.id, record.org, record.role
            );
            println!("{}", new.reveal());
        }
        KeysCommand::List { org } => {
            println!(
                "{:<18} {:<20} {:<7} {:<8} name",
                "id", "org", "role", "state"
            );
            for k in storage.list_keys(org.as_deref()).await? {
                let state = if k.revoked_at.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                println!(
                    "{:<18} {:<20} {:<7} {:<8} {}",
                    k.id,
                    k.org,
                    k.role,
                    state,
                    k.name.unwrap_or_default()
                );
            }
        }
        KeysCommand::Revoke { id } => {
            if !storage
                .revoke_key(id, chrono::Utc::now().timestamp())
                .await?
            {
                bail!("no active key with id {id}");
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}

async fn orgs(storage: &Storage, cmd: &OrgsCommand) -> Result<()> {
    match cmd {
        OrgsCommand::Create { id, name, plan } => {
            let org = OrgRecord {
                id: id.clone(),
                name: name.clone().unwrap_or_else(|| id.clone()),
                plan: plan.clone(),
                created_at: chrono::Utc::now().timestamp(),
            };
            storage.create_org(&org).await.map_err(|e| {
                if e.is_unique_violation() {
                    anyhow::anyhow!("org {id} already exists")
                } else {
                    e.into()
                }
            })?;
            println!("created org {id}");
        }
        OrgsCommand::List => {
            println!("{:<20} {:<12} name", "id", "plan");
            for o in storage.list_orgs().await? {
                println!("{:<20} {:<12} {}", o.id, o.plan.unwrap_or_default(), o.name);
            }
        }
    }
    Ok(())
}

async fn report(storage: &Storage, policy: Option<&PolicyFile>, args: &ReportArgs) -> Result<()> {
    let name = args.name.as_str();
    let query = args.query();
    let ctx = ReportCtx {
        storage,
        policy,
        org: args.org.as_deref(),
        now: chrono::Utc::now(),
    };
    let rendered = match crate::reports::run_named(name, ctx, &query).await {
        None => bail!(
            "unknown report '{name}' (one of: {})",
            crate::reports::NAMES.join(", ")
        ),
        // A bad parameter: the report's message names it and says what is expected.
        Some(Err(e @ ReportError::BadParam { .. })) => bail!("report {name}: {e}"),
        Some(Err(e)) => {
            return Err(anyhow::Error::new(e).context(format!("report {name} failed")));
        }
        Some(Ok(r)) => r,
    };
    let out = match args.format {
        ReportFormat::Table => rendered.table.to_text(),
        ReportFormat::Json => {
            let mut text = serde_json::to_string_pretty(&rendered.json)
                .context("cannot serialise the report as JSON")?;
            text.push('\n');
            text
        }
        ReportFormat::Csv => rendered.table.to_csv(),
    };
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot write the report to stdout")?;
    Ok(())
}

/// Everything `serve` builds, for tests that want a running state without a socket.
pub fn build_state(
    storage: Storage,
    limits: Limits,
    policy: Option<PolicyFile>,
    committers: usize,
) -> (AppState, tokio::task::JoinHandle<()>) {
    let metrics = Arc::new(Metrics::default());
    let (writer, task) = Writer::spawn(
        storage.clone(),
        metrics.clone(),
        limits.max_queued_events,
        limits.max_group_events,
        committers,
        policy
            .as_ref()
            .map(|p| p.dimensions.clone())
            .unwrap_or_default(),
    );
    // Both values come from `Limits`; zero is the only way to make the policy invalid.
    let report_limiter = ReportLimiter::new(
        limits.report_rate_per_minute.max(1),
        limits.report_burst.max(1),
    )
    .map(Arc::new)
    .unwrap_or_else(|e| unreachable!("a non-zero token bucket always compiles: {e}"));
    (
        AppState {
            storage,
            writer,
            metrics,
            limits: Arc::new(limits),
            policy: policy.map(Arc::new),
            report_limiter,
        },
        task,
    )
}

async fn serve(storage: Storage, args: ServeArgs) -> Result<()> {
    let policy = args.policy.as_deref().map(load_policy).transpose()?;
    let limits = Limits {
        max_body_bytes: args.max_body_bytes,
        retention: Duration::from_secs(args.retention_days * 86_400),
        max_queued_events: args.max_queued_events,
        ..Limits::default()
    };
    let committers = args
        .committers
        .unwrap_or_else(|| storage.default_committers());
    let retention = limits.retention;
    let minute_retention = Duration::from_secs(args.minute_rollup_days * 86_400);
    let (state, writer_task) = build_state(storage.clone(), limits, policy, committers);

    let pruner = {
        let storage = storage.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3_600));
            loop {
                tick.tick().await;
                let now = chrono::Utc::now();
                let cutoff = now - chrono::Duration::from_std(retention).unwrap_or_default();
                let minute_cutoff =
                    now - chrono::Duration::from_std(minute_retention).unwrap_or_default();
                if let Err(e) = storage.prune(cutoff, minute_cutoff).await {
                    tracing::warn!(error = %e, "pruning failed");
                }
            }
        })
    };

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, engine = storage.engine(), committers, "collector listening");
    println!("listening on http://{addr}");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("server failed")?;
    // Every request has been answered; the committers drain what is queued and stop.
    tracing::info!("draining the write queue");
    let _ = writer_task.await;
    pruner.abort();
    storage.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested: finishing in-flight batches");
}
