//! `tartarus apikey create|list|revoke`: manage API keys in the server's state store directly.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use tartarus_store::{Role, Store};

#[derive(Args, Debug)]
pub struct ApiKeyArgs {
    /// The server's data directory (default: $TARTARUS_DATA_DIR, else /var/lib/tartarus as root,
    /// ~/.local/share/tartarus otherwise)
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The server's PostgreSQL database, when it uses one (as `tartarus server --database`)
    #[arg(long, global = true, env = "TARTARUS_DATABASE_URL", value_name = "URL")]
    database: Option<String>,
    #[command(subcommand)]
    command: ApiKeyCommand,
}

#[derive(Subcommand, Debug)]
enum ApiKeyCommand {
    /// Create a key and print its secret (shown once, stored only as a hash)
    Create {
        /// Tenant the key belongs to (lower-case letters, digits, '-', '_'); not for admin keys, which see
        /// every tenant
        #[arg(long)]
        tenant: Option<String>,
        /// admin, user or viewer
        #[arg(long, default_value = "user")]
        role: String,
    },
    /// List keys (never their secrets)
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id
    Revoke { id: String },
}

/// The tenant a new key belongs to. An admin key sees and changes every tenant's objects, so it cannot be
/// one tenant's: it belongs to the admin tenant, and `--tenant` (other than that) is refused rather than
/// giving a key that looks scoped and is not.
fn key_tenant(tenant: Option<String>, role: Role) -> anyhow::Result<String> {
    match (role, tenant) {
        (Role::Admin, None) => Ok(ADMIN_TENANT.to_string()),
        (Role::Admin, Some(t)) if t == ADMIN_TENANT => Ok(t),
        (Role::Admin, Some(t)) => anyhow::bail!(
            "an admin key is not scoped to a tenant: it sees and changes every tenant, '{t}' included; \
             drop --tenant for an admin key, or create a user key with --tenant {t} --role user"
        ),
        (_, Some(t)) => Ok(t),
        (_, None) => anyhow::bail!("--tenant is required for user and viewer keys"),
    }
}

/// The tenant of admin keys (the server's own `admin.key` is one).
const ADMIN_TENANT: &str = "admin";

/// Where the server keeps its state unless told otherwise.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TARTARUS_DATA_DIR") {
        return dir.into();
    }
    if rustix::process::geteuid().is_root() {
        return "/var/lib/tartarus".into();
    }
    match std::env::var_os("XDG_DATA_HOME") {
        Some(dir) => PathBuf::from(dir).join("tartarus"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".local/share/tartarus"),
    }
}

pub fn run(args: ApiKeyArgs) -> anyhow::Result<u8> {
    let dir = args.data_dir.unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("cannot create data directory {}: {e}", dir.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let store = match &args.database {
            Some(url) => Store::connect(url).await?,
            None => Store::open(&dir).await?,
        };
        match args.command {
            ApiKeyCommand::Create { tenant, role } => {
                let role: Role = role.parse()?;
                let tenant = key_tenant(tenant, role)?;
                let (key, secret) = store.create_key(&tenant, role).await?;
                println!("{secret}");
                eprintln!(
                    "tartarus: created {} for tenant {} with role {}; the secret above is shown only once",
                    key.id,
                    key.tenant,
                    key.role.as_str()
                );
            }
            ApiKeyCommand::List { json } => {
                let keys = store.list_keys().await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&keys)?);
                } else {
                    println!("{:<22} {:<20} {:<7} STATUS", "ID", "TENANT", "ROLE");
                    for k in keys {
                        let status = if k.revoked_ms.is_some() {
                            "revoked"
                        } else {
                            "active"
                        };
                        println!("{:<22} {:<20} {:<7} {status}", k.id, k.tenant, k.role.as_str());
                    }
                }
            }
            ApiKeyCommand::Revoke { id } => {
                let key = store.revoke_key(&id).await?;
                eprintln!("tartarus: revoked {} (tenant {})", key.id, key.tenant);
            }
        }
        Ok(0)
    })
}
