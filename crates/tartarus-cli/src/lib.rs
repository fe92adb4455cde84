//! The `tartarus` command line: commands as a library, shared by the `tartarus` binary (run, shim, gc, runtimes,
//! client commands: kept lean, since it starts for every sandbox) and `tartarus-server` (the HTTP server
//! and key management, with their heavier dependencies).

pub mod client;
pub mod commands;
pub mod terminal;

/// The command line, shared by both binaries so they parse exactly the same arguments.
pub mod cli {
    use clap::{Parser, Subcommand};

    use crate::commands;

    #[derive(Parser)]
    #[command(
        name = "tartarus",
        bin_name = "tartarus",
        version,
        about = "Run untrusted code in isolated sandboxes",
        propagate_version = true
    )]
    pub struct Cli {
        #[command(subcommand)]
        pub command: Command,
    }

    /// What the lean `tartarus` binary parses itself: the commands that start sandboxes. Everything else
    /// (help, version, completions, the control plane and clients) is handed to `tartarus-control`
    /// before any parsing, so the start-up every sandbox pays builds no argument tree for commands it
    /// does not run.
    #[derive(Parser)]
    #[command(name = "tartarus", version)]
    pub struct LeanCli {
        #[command(subcommand)]
        pub command: LeanCommand,
    }

    #[derive(Subcommand)]
    #[allow(clippy::large_enum_variant)] // parsed once per process; boxing buys nothing
    pub enum LeanCommand {
        Run(commands::run::RunArgs),
        Gc,
        Shim(commands::shim::ShimArgs),
        Runtimes(commands::runtimes::RuntimesArgs),
        /// The E2B-compatible in-sandbox daemon (run inside a sandbox by the server)
        #[command(hide = true)]
        Envd(commands::envd::EnvdArgs),
    }

    /// Whether the lean binary handles this first argument itself.
    pub fn is_lean_command(first: &std::ffi::OsStr) -> bool {
        first == "run" || first == "gc" || first == "shim" || first == "runtimes" || first == "envd"
    }

    #[derive(Subcommand)]
    #[allow(clippy::large_enum_variant)] // parsed once per process; boxing buys nothing
    pub enum Command {
        /// Run a command in a new sandbox and exit with its exit code
        Run(commands::run::RunArgs),
        /// Remove cgroups, sandbox networks and gVisor containers left behind by a crashed `tartarus run`
        Gc,
        /// Show which isolation lanes this host can run (and why not), with each engine's version
        Runtimes(commands::runtimes::RuntimesArgs),
        /// Serve the REST API over long-lived sandboxes
        Server(commands::server::ServerArgs),
        /// Set or show where the server is and which key to use
        Config(commands::remote::ConfigArgs),
        /// Create a sandbox on the server and print its id
        Create(commands::remote::CreateArgs),
        /// List sandboxes on the server
        Ps(commands::remote::PsArgs),
        /// Show one sandbox as JSON
        Inspect { id: String },
        /// Run a command in a sandbox on the server; exits with its exit code
        Exec(commands::remote::ExecArgs),
        /// Print a sandbox's main output (--follow streams it)
        Logs {
            id: String,
            #[arg(long, short = 'f')]
            follow: bool,
        },
        /// Copy a file between the host and a sandbox (SANDBOX_ID:/path on one side)
        Cp { src: String, dst: String },
        /// Kill a sandbox on the server and remove it
        Kill { id: String },
        /// Pause a sandbox on the server: freeze its processes, or with --disk save it to a snapshot and
        /// release its CPU and memory (lanes with pause_to_disk: gvisor)
        Pause {
            id: String,
            /// Save memory, processes and scratch files to disk instead of freezing them in memory
            #[arg(long)]
            disk: bool,
        },
        /// Resume a paused sandbox on the server (thawed, or restored from its snapshot)
        Resume { id: String },
        /// Quarantine a sandbox on the server: cut its network off and freeze it for inspection
        Quarantine { id: String },
        /// Show the audit trail of the server (newest first)
        Audit(commands::remote::AuditArgs),
        /// Manage API keys of the server (tenants and roles)
        Apikey(commands::apikey::ApiKeyArgs),
        /// Manage templates on the server (an image plus defaults and a warm-up)
        Template(commands::template::TemplateArgs),
        /// Run agents on repositories: `task create --project P --agent A --prompt …`, get, ls, logs, cancel
        Task(commands::task::TaskArgs),
        /// Register the repositories tasks run on
        Project(commands::task::ProjectArgs),
        /// Write a starting file locally: `init template --name NAME --from IMAGE`
        Init(commands::template::InitArgs),
        /// Pull and manage OCI images in the local store
        Image(commands::image::ImageArgs),
        /// Check the verifiable-effects format against its golden vectors
        Conformance(commands::conformance::ConformanceArgs),
        /// Store, fetch and verify content-addressed blobs on the server
        Blob(commands::effects::BlobArgs),
        /// Declare the tools sandboxes may call through the gateway
        Tool(commands::effects::ToolArgs),
        /// List, show and verify signed receipts of tool calls
        Receipts(commands::effects::ReceiptsArgs),
        /// List, export and verify episodes (the signed record of one sandbox run)
        Episode(commands::effects::EpisodeArgs),
        /// Sign and send evaluator feedback on an episode
        Signal(commands::effects::SignalArgs),
        /// Register the keys evaluators sign signals with
        Evaluator(commands::effects::EvaluatorArgs),
        /// Build deterministic datasets from episodes
        Dataset(commands::effects::DatasetArgs),
        /// Run a node agent (`--control URL --token T`), or manage nodes (`token create`, `ls`)
        Node(commands::node::NodeArgs),
        /// Show or rotate the server's signing keys
        Keys(commands::effects::KeysArgs),
        /// Apply, inspect, and roll back the server's policies
        Policy(commands::policy::PolicyArgs),
        /// Show the server's event stream (enforcement, admission rejections, dead letters)
        Events(commands::policy::EventsArgs),
        /// Use the unmodified E2B SDKs with this server: `eval "$(tartarus e2b env)"`
        E2b(commands::e2b::E2bArgs),
        /// Supervise one long-lived sandbox and serve requests for it on a unix socket (used by the server)
        #[command(hide = true)]
        Shim(commands::shim::ShimArgs),
        /// The E2B-compatible in-sandbox daemon (run inside a sandbox by the server)
        #[command(hide = true)]
        Envd(commands::envd::EnvdArgs),
        /// Print a shell completion script
        Completions {
            #[arg(value_enum)]
            shell: clap_complete::Shell,
        },
    }

    /// Runs a control-plane or client command (everything but run, gc and shim).
    pub fn run_control(command: Command) -> anyhow::Result<u8> {
        match command {
            Command::Server(args) => commands::server::run(args),
            Command::Apikey(args) => commands::apikey::run(args),
            Command::Config(args) => commands::remote::config(args),
            Command::Create(args) => commands::remote::create(args),
            Command::Ps(args) => commands::remote::ps(args),
            Command::Inspect { id } => commands::remote::inspect(id),
            Command::Exec(args) => commands::remote::exec(args),
            Command::Logs { id, follow } => commands::remote::logs(id, follow),
            Command::Cp { src, dst } => commands::remote::cp(src, dst),
            Command::Kill { id } => commands::remote::kill(id),
            Command::Pause { id, disk } => commands::remote::set_paused(id, true, disk),
            Command::Resume { id } => commands::remote::set_paused(id, false, false),
            Command::Quarantine { id } => commands::remote::quarantine(id),
            Command::Audit(args) => commands::remote::audit(args),
            Command::Template(args) => commands::template::run(args),
            Command::Init(args) => commands::template::init(args),
            Command::Task(args) => commands::task::run(args),
            Command::Project(args) => commands::task::run_project(args),
            Command::Image(args) => commands::image::run(args),
            Command::Conformance(args) => commands::conformance::run(args),
            Command::Policy(args) => commands::policy::run(args),
            Command::Blob(args) => commands::effects::blob(args),
            Command::Tool(args) => commands::effects::tool(args),
            Command::Receipts(args) => commands::effects::receipts(args),
            Command::Episode(args) => commands::effects::episode(args),
            Command::Signal(args) => commands::effects::signal(args),
            Command::Evaluator(args) => commands::effects::evaluator(args),
            Command::Dataset(args) => commands::effects::dataset(args),
            Command::Keys(args) => commands::effects::keys(args),
            Command::Node(args) => commands::node::run_node(args),
            Command::Events(args) => commands::policy::events(args),
            Command::E2b(args) => commands::e2b::run(args),
            Command::Completions { shell } => {
                use clap::CommandFactory;
                clap_complete::generate(shell, &mut Cli::command(), "tartarus", &mut std::io::stdout());
                Ok(0)
            }
            Command::Run(_) | Command::Gc | Command::Shim(_) | Command::Runtimes(_) | Command::Envd(_) => {
                anyhow::bail!("this command belongs to the tartarus binary")
            }
        }
    }
}

/// Exit code for a failure of Tartarus itself (as opposed to the sandboxed command's own exit code).
pub const EXIT_TARTARUS_ERROR: u8 = 125;

pub use tartarus_runtime::error_chain;

/// Prints `tartarus: <error>: <cause>: <cause>` on one line.
pub fn print_error(e: &(dyn std::error::Error + 'static)) {
    eprintln!("tartarus: {}", error_chain(e));
}
