//! The `scm-security` binary: parses the command line and runs a subcommand.

use anyhow::Context as _;
use clap::Parser as _;
use scm_security::config::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn init_logs(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_logs(args.log_json);
            let running = scm_security::server::start(&args)
                .await
                .context("starting the Security server")?;
            running.wait().await;
        }
        Command::Init(args) => {
            let (master, token) = scm_security::server::secret_paths(
                &args.data_dir,
                args.master_key_file.as_ref(),
                args.admin_token_file.as_ref(),
            );
            scm_security::keys::write_secret_file(
                &master,
                &scm_security::keys::new_master_key_text(),
            )
            .context("writing the master key")?;
            scm_security::keys::write_secret_file(
                &token,
                &scm_security::keys::new_admin_token_text(),
            )
            .context("writing the admin token")?;
            println!(
                "wrote {} and {} (mode 0600)",
                master.display(),
                token.display()
            );
        }
        Command::DevCerts(args) => {
            scm_security::devcerts::generate(&args.out, &args.sans, args.force)
                .context("making development certificates")?;
            println!(
                "wrote {} into {}",
                scm_security::devcerts::FILES.join(" "),
                args.out.display()
            );
        }
        Command::Admin(args) => {
            let out = scm_security::cli::run(&args).await?;
            print!("{out}");
        }
    }
    Ok(())
}
