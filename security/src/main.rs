//! The `scm-security` binary: parses the command line and runs a subcommand, one function each.

use anyhow::Context as _;
use clap::Parser as _;
use scm_proto::ops::logs::LogArgs;
use scm_security::config::{
    AdminArgs, BackupArgs, Cli, Command, DevCertsArgs, InitArgs, RestoreArgs, ServeArgs,
};
use scm_security::store::Store;

fn init_logs(log: &LogArgs) -> anyhow::Result<()> {
    log.init().map_err(anyhow::Error::msg)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Init(args) => init(args),
        Command::DevCerts(args) => dev_certs(args),
        Command::Admin(args) => admin(args).await,
        Command::Backup(args) => backup(args).await,
        Command::Restore(args) => restore(args).await,
        Command::Generate(g) => Ok(scm_proto::cli::main(
            <scm_security::config::Cli as clap::CommandFactory>::command(),
            g,
        )?),
    }
}

/// `serve`: runs the server until SIGINT or SIGTERM.
async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    init_logs(&args.log)?;
    let running = scm_security::server::start(args)
        .await
        .context("starting the Security server")?;
    // Every listener is bound: a Type=notify unit is started now, not when the process forked.
    let status = format!(
        "serving devices on {}, proxies on {}, admin on {}",
        running.device_addr, running.proxy_addr, running.admin_addr
    );
    if let Err(e) = scm_proto::lifecycle::notify::ready(&status) {
        tracing::warn!(error = %e, "cannot tell systemd the server is ready");
    }
    running.wait().await;
    Ok(())
}

/// `init`: writes a new master key and admin token.
fn init(args: &InitArgs) -> anyhow::Result<()> {
    let (master, token) = scm_security::data_dir::secret_paths(
        &args.data_dir,
        args.master_key_file.as_ref(),
        args.admin_token_file.as_ref(),
    );
    scm_security::secrets::write_secret_file(
        &master,
        &scm_security::master_key::new_master_key_text(),
    )
    .context("writing the master key")?;
    scm_security::secrets::write_secret_file(
        &token,
        &scm_security::admin_token::new_admin_token_text(),
    )
    .context("writing the admin token")?;
    println!(
        "wrote {} and {} (mode 0600)",
        master.display(),
        token.display()
    );
    Ok(())
}

/// `dev-certs`: makes development certificates.
fn dev_certs(args: &DevCertsArgs) -> anyhow::Result<()> {
    scm_security::devcerts::generate(&args.out, &args.sans, args.force)
        .context("making development certificates")?;
    println!(
        "wrote {} into {}",
        scm_security::devcerts::FILES.join(" "),
        args.out.display()
    );
    Ok(())
}

/// `admin ...`: one call to the admin API.
async fn admin(args: &AdminArgs) -> anyhow::Result<()> {
    let out = scm_security::cli::run(args).await?;
    print!("{out}");
    Ok(())
}

/// `backup`: a snapshot of a (running or stopped) instance.
async fn backup(args: &BackupArgs) -> anyhow::Result<()> {
    init_logs(&LogArgs::default())?;
    let db_file = args.data_dir.join("scm.db");
    if args.database_url.is_none() && !db_file.exists() {
        anyhow::bail!(
            "no database at {}: name the instance's --data-dir or --database-url",
            db_file.display()
        );
    }
    let url = args
        .database_url
        .clone()
        .unwrap_or_else(|| Store::sqlite_url(&args.data_dir));
    let (master_path, _) =
        scm_security::data_dir::secret_paths(&args.data_dir, args.master_key_file.as_ref(), None);
    let master = scm_security::master_key::MasterKey::load(&master_path).with_context(|| {
        format!(
            "reading the master key {} (it authenticates the snapshot)",
            master_path.display()
        )
    })?;
    let store = Store::open(&url).await.context("opening the database")?;
    let started = std::time::Instant::now();
    let m = scm_security::backup::snapshot(&store, &master, &args.data_dir, &args.out)
        .await
        .with_context(|| format!("backing up into {}", args.out.display()))?;
    store.close().await;
    println!(
        "snapshot {}: schema {}, {} users, {} device keys, {} app packages, in {:.1}s",
        args.out.display(),
        m.schema_version,
        m.rows("users"),
        m.rows("device_keys"),
        m.files.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `restore`: a snapshot into a new instance.
async fn restore(args: &RestoreArgs) -> anyhow::Result<()> {
    init_logs(&LogArgs::default())?;
    let started = std::time::Instant::now();
    let (master_path, _) =
        scm_security::data_dir::secret_paths(&args.data_dir, args.master_key_file.as_ref(), None);
    if !master_path.exists() {
        anyhow::bail!(
            "{} does not exist: copy the master key file of the instance that was \
                     backed up there (or name it with --master-key-file); without it the \
                     restored devices could not log in",
            master_path.display()
        );
    }
    let master = scm_security::master_key::MasterKey::load(&master_path)
        .context("reading the master key")?;
    let unauth = if args.allow_unauthenticated {
        scm_security::backup::Unauthenticated::Allow
    } else {
        scm_security::backup::Unauthenticated::Refuse
    };
    // Check the snapshot before creating anything.
    scm_security::backup::check_restorable(&args.from, &master, unauth)
        .with_context(|| format!("checking {}", args.from.display()))?;
    scm_security::fsmode::create_private_dir(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let url = args
        .database_url
        .clone()
        .unwrap_or_else(|| Store::sqlite_url(&args.data_dir));
    let store = Store::open(&url)
        .await
        .context("opening the target database")?;
    let m = scm_security::backup::restore_with(&store, &master, &args.data_dir, &args.from, unauth)
        .await
        .with_context(|| format!("restoring {}", args.from.display()))?;
    store.close().await;
    println!(
        "restored {} (taken at {}): {} users, {} device keys, {} app packages, in {:.1}s",
        args.from.display(),
        m.created_at,
        m.rows("users"),
        m.rows("device_keys"),
        m.files.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
