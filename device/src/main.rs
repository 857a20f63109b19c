//! `scm-device`: the device client's command line. State (enrollment and session) lives in one
//! JSON file, mode 0600, named by --state.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use scm_device::state::State;
use scm_device::{Device, DeviceConfig, Session};

/// scm's device client: enroll, log in, reach intranet resources through a proxy, update, log out.
///
/// Typical use:
///   scm-device --state alice.json enroll --security-url https://127.0.0.1:8443 --ca ca.pem \
///       --user alice --device-id phone-1 --app-id mail --app-version 1.0.0 --platform android
///   scm-device --state alice.json login
///   scm-device --state alice.json tunnel -L 127.0.0.1:7000:echo
///   scm-device --state alice.json get http://intranet/
///   scm-device --state alice.json update check
///   scm-device --state alice.json logout
///
/// Passwords come from --password, SCM_DEVICE_PASSWORD, or the first line of standard input.
#[derive(Debug, Parser)]
#[command(name = "scm-device", version, verbatim_doc_comment)]
struct Cli {
    /// The state file (enrollment with its shared key, and the session). Created with mode 0600.
    #[arg(
        long,
        global = true,
        env = "SCM_DEVICE_STATE",
        default_value = "scm-device.json"
    )]
    state: PathBuf,
    /// `--log-json`, `--log-level`.
    #[command(flatten)]
    log: scm_proto::ops::logs::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll this device and app for a user: the Security server issues the shared key.
    Enroll {
        /// Security server base URL (repeat for fail-over instances).
        #[arg(
            long = "security-url",
            env = "SCM_DEVICE_SECURITY_URLS",
            value_delimiter = ',',
            required = true
        )]
        security_urls: Vec<String>,
        /// PEM CA certificate that signs the Security server's and the proxies' certificates.
        #[arg(long, env = "SCM_DEVICE_CA")]
        ca: PathBuf,
        /// `user` or `user@site`.
        #[arg(long, env = "SCM_DEVICE_USER")]
        user: String,
        /// The password (else SCM_DEVICE_PASSWORD, else standard input).
        #[arg(long, env = "SCM_DEVICE_PASSWORD", hide_env_values = true)]
        password: Option<SecretArg>,
        /// This device's id.
        #[arg(long, env = "SCM_DEVICE_ID")]
        device_id: String,
        /// The app's id.
        #[arg(long, env = "SCM_DEVICE_APP_ID")]
        app_id: String,
        /// The app's version on this device.
        #[arg(long, env = "SCM_DEVICE_APP_VERSION")]
        app_version: String,
        /// The platform, for updates.
        #[arg(long, env = "SCM_DEVICE_PLATFORM", default_value = "android")]
        platform: String,
        /// Activation code, if the server requires one.
        #[arg(long, env = "SCM_DEVICE_ACTIVATION_CODE", hide_env_values = true)]
        activation_code: Option<SecretArg>,
    },
    /// Log in (credentials + proof of the shared key); the session is saved in the state file.
    Login {
        /// The password (else SCM_DEVICE_PASSWORD, else standard input).
        #[arg(long, env = "SCM_DEVICE_PASSWORD", hide_env_values = true)]
        password: Option<SecretArg>,
    },
    /// Forward local connections to a tcp resource through a proxy, like `ssh -L`.
    Tunnel {
        /// LOCAL_ADDR:PORT:RESOURCE, e.g. 127.0.0.1:7000:echo.
        #[arg(short = 'L', long = "local")]
        forward: String,
    },
    /// GET a URL of an http resource through a proxy: http://RESOURCE/PATH. Prints the body.
    Get {
        /// e.g. http://intranet/index.html
        url: String,
        /// Print the status line and headers to standard error too.
        #[arg(short, long)]
        include: bool,
    },
    /// App updates.
    Update {
        #[command(subcommand)]
        what: UpdateCommand,
    },
    /// End the session on the Security server (every proxy closes its connections).
    Logout,
    /// Print the state: user, device, app, session tag and proxies (no secrets).
    Status,
    /// Man pages, shell completions, the unit's EnvironmentFile (`cargo xtask package`).
    #[command(hide = true, subcommand)]
    Generate(scm_proto::cli::Generate),
}

#[derive(Debug, Subcommand)]
enum UpdateCommand {
    /// Ask whether a newer release exists and whether this version may still be used.
    Check,
    /// Download the newest release and verify its SHA-256.
    Fetch {
        /// Where to write the package (default: APP-VERSION-PLATFORM.pkg).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// A secret given as a flag or in the environment (password, activation code): its `Debug`
/// prints `<redacted>`, so `{:?}` of the parsed command line shows none.
#[derive(Clone)]
struct SecretArg(String);

impl From<String> for SecretArg {
    fn from(text: String) -> Self {
        Self(text)
    }
}

impl std::fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&scm_proto::redact::Redacted, f)
    }
}

fn password(given: Option<&SecretArg>) -> Result<String> {
    if let Some(p) = given {
        return Ok(p.0.clone());
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let p = line.trim_end_matches(['\r', '\n']).to_owned();
    if p.is_empty() {
        bail!("no password: give --password, SCM_DEVICE_PASSWORD or a line on standard input");
    }
    Ok(p)
}

fn load(cli: &Cli) -> Result<(State, Device)> {
    let state = State::load(&cli.state).with_context(|| {
        format!(
            "no enrollment at {} (run `scm-device enroll` first)",
            cli.state.display()
        )
    })?;
    let device = Device::from_enrollment(state.enrollment.clone())?;
    Ok((state, device))
}

fn session(cli: &Cli) -> Result<(State, Device, Session)> {
    let (state, device) = load(cli)?;
    let Some(saved) = state.session.clone() else {
        bail!("not logged in (run `scm-device login`)");
    };
    let session = Session::restore(&device, saved)?;
    Ok((state, device, session))
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    cli.log.init().map_err(anyhow::Error::msg)?;
    match &cli.command {
        Command::Enroll {
            security_urls,
            ca,
            user,
            password: pw,
            device_id,
            app_id,
            app_version,
            platform,
            activation_code,
        } => {
            let ca = std::path::absolute(ca).context("resolving --ca")?;
            let config = DeviceConfig {
                security_urls: security_urls.clone(),
                ca_file: ca,
                device_id: device_id.clone(),
                app_id: app_id.clone(),
                app_version: app_version.clone(),
                platform: platform.clone(),
            };
            let pw = password(pw.as_ref())?;
            let code = activation_code.as_ref().map(|c| c.0.clone());
            let device = Device::enroll(config, user, &pw, code).await?;
            State {
                enrollment: device.enrollment().clone(),
                session: None,
            }
            .save(&cli.state)?;
            println!(
                "enrolled {user} on device {device_id} for app {app_id} (key {}); state in {}",
                device.enrollment().key_id,
                cli.state.display()
            );
        }
        Command::Login { password: pw } => {
            let (mut state, device) = load(&cli)?;
            let session = device.login(&password(pw.as_ref())?).await?;
            state.session = Some(session.saved().clone());
            state.save(&cli.state)?;
            let s = &session.saved().login;
            println!(
                "logged in as {} (groups {}; site {}); session {}; proxies {}",
                s.user,
                s.groups.join(","),
                s.site,
                session.tag(),
                s.proxy_urls.join(",")
            );
        }
        Command::Tunnel { forward } => {
            let (_, _, session) = session(&cli)?;
            let (local, resource) = scm_device::tunnel::parse_forward(forward)?;
            let listener = tokio::net::TcpListener::bind(local)
                .await
                .with_context(|| format!("binding {local}"))?;
            println!(
                "forwarding {} -> {resource} through {}",
                listener.local_addr()?,
                session.proxies().join(",")
            );
            tokio::select! {
                r = scm_device::tunnel::serve(listener, session, resource) => r?,
                r = scm_proto::shutdown::shutdown_signal() => {
                    r.context("installing the SIGTERM/SIGINT handlers")?;
                }
            }
        }
        Command::Get { url, include } => {
            let (_, _, session) = session(&cli)?;
            let resp = session.get(url).await?;
            if *include {
                eprintln!("HTTP {}", resp.status);
                for (k, v) in &resp.headers {
                    eprintln!("{k}: {}", v.to_str().unwrap_or("<binary>"));
                }
            }
            use std::io::Write as _;
            std::io::stdout().write_all(&resp.body)?;
            if !(200..300).contains(&resp.status) {
                bail!("HTTP {}", resp.status);
            }
        }
        Command::Update { what } => {
            let (state, device) = load(&cli)?;
            let bearer = state.session.as_ref().map(|s| s.login.session_id.clone());
            let check = device.update_check(bearer.as_deref()).await?;
            match what {
                UpdateCommand::Check => {
                    println!("{}", serde_json::to_string_pretty(&check)?);
                }
                UpdateCommand::Fetch { out } => {
                    let Some(latest) = check.latest.filter(|_| check.update_available) else {
                        println!("no update available");
                        return Ok(());
                    };
                    let out = out.clone().unwrap_or_else(|| {
                        format!(
                            "{}-{}-{}.pkg",
                            latest.app_id, latest.version, latest.platform
                        )
                        .into()
                    });
                    let n = device
                        .update_fetch(&latest, &out, bearer.as_deref())
                        .await?;
                    println!(
                        "fetched {} {} ({n} bytes, sha256 {} verified) to {}",
                        latest.app_id,
                        latest.version,
                        latest.sha256,
                        out.display()
                    );
                }
            }
        }
        Command::Logout => {
            let (mut state, _, session) = session(&cli)?;
            session.logout().await?;
            state.session = None;
            state.save(&cli.state)?;
            println!("logged out (session {})", session.tag());
        }
        Command::Status => {
            let (state, _) = load(&cli)?;
            let e = &state.enrollment;
            println!(
                "user {} device {} app {} {} ({}); security {}",
                e.username,
                e.config.device_id,
                e.config.app_id,
                e.config.app_version,
                e.config.platform,
                e.config.security_urls.join(",")
            );
            match state.session.as_ref().map(|s| &s.login) {
                Some(s) => println!(
                    "session {} as {}; proxies {}",
                    scm_proto::crypto::session_tag(&s.session_id),
                    s.user,
                    s.proxy_urls.join(",")
                ),
                None => println!("not logged in"),
            }
        }
        Command::Generate(g) => {
            scm_proto::cli::main(<Cli as clap::CommandFactory>::command(), g)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_the_command_line_hides_secrets() {
        for args in [
            &[
                "scm-device",
                "enroll",
                "--security-url",
                "https://127.0.0.1:8443",
                "--ca",
                "ca.pem",
                "--user",
                "alice",
                "--password",
                "s3cret-Zq9",
                "--device-id",
                "phone",
                "--app-id",
                "mail",
                "--app-version",
                "1.0",
                "--activation-code",
                "c0de-Zq9",
            ][..],
            &["scm-device", "login", "--password", "s3cret-Zq9"][..],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            let printed = format!("{cli:?}");
            assert!(!printed.contains("s3cret-Zq9"), "{printed}");
            assert!(!printed.contains("c0de-Zq9"), "{printed}");
            assert!(printed.contains("<redacted>"), "{printed}");
        }
    }
}
