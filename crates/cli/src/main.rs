//! `dsvl`: the command users run by hand. Each subcommand lives in its own module; this file
//! only parses arguments, sets up logging and turns errors into a message and exit code 1.

mod chat_client;
mod chat_repl;
mod cluster;
mod demo;
mod encode;
mod generate;
mod heal;
mod model_args;
mod procs;
mod progress;
mod redis_acl;
mod up;
mod worker;

use clap::{Parser, Subcommand};

/// The services' allocator: `encode`, `generate` and the workers run the models in this
/// process, and reuse freed activations instead of refaulting them (dsvl_core::allocator).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// DeepSeek-VL serving cluster: offline tools and the local cluster.
#[derive(Parser)]
#[command(name = "dsvl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The main job on embedded defaults: the local cluster on the bundled tiny model, one
    /// multimodal request through the gateway twice (the second from the cache), per-tier timing.
    Demo(demo::DemoArgs),
    /// Start the local cluster (gateway, vision-encoder, decoder with --tp ranks) until Ctrl-C.
    Up(up::UpArgs),
    /// Chat with a gateway: interactive on the terminal (`/image`, `/reset`, `/stats`), or one
    /// reply to a conversation file (`--chat`, same file and output as `generate`).
    Chat(chat_client::ChatArgs),
    /// Encode images to DeepSeek-VL image embeddings (preprocessing + vision tower + aligner).
    Encode(encode::EncodeArgs),
    /// Generate a reply to a conversation (CHAT.json), optionally tensor-parallel over --tp ranks.
    Generate(generate::GenerateArgs),
    /// Print the Redis ACL file of a deployment: one least-privilege user per tier, passwords
    /// from DSVL_REDIS_{GATEWAY,VISION,DECODER}_PASSWORD.
    RedisAcl(redis_acl::RedisAclArgs),
    /// One rank of a tensor-parallel group (started by a leader; not for direct use).
    #[command(hide = true)]
    RankWorker(worker::WorkerArgs),
}

fn main() {
    dsvl_core::allocator::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,dsvl_telemetry::progress=info".into()),
        )
        .with_ansi(dsvl_telemetry::logs::ansi_on_stderr())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Up(args) => up::run(args),
        Command::Chat(args) => chat_client::run(args),
        Command::Encode(args) => encode::run(args),
        Command::Generate(args) => generate::run(args),
        Command::RedisAcl(args) => redis_acl::run(args),
        Command::RankWorker(args) => worker::run(args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
