//! `dsvl redis-acl`: the Redis ACL file of a deployment, one least-privilege user per tier
//! (`dsvl_cache::acl`), with the default user off. The passwords come from the environment so
//! they stay out of shell history and process listings.

use anyhow::{ensure, Result};
use clap::Args;

/// Arguments of `dsvl redis-acl`.
#[derive(Args, Debug)]
pub struct RedisAclArgs {
    /// Password of the gateway's user `dsvl-gateway`.
    #[arg(long, env = "DSVL_REDIS_GATEWAY_PASSWORD", hide_env_values = true)]
    gateway_password: String,
    /// Password of the vision tier's user `dsvl-vision`.
    #[arg(long, env = "DSVL_REDIS_VISION_PASSWORD", hide_env_values = true)]
    vision_password: String,
    /// Password of the decoder's user `dsvl-decoder`.
    #[arg(long, env = "DSVL_REDIS_DECODER_PASSWORD", hide_env_values = true)]
    decoder_password: String,
}

/// Prints the ACL file.
pub fn run(args: RedisAclArgs) -> Result<()> {
    for p in [&args.gateway_password, &args.vision_password, &args.decoder_password] {
        ensure!(
            p.len() >= 16 && p.bytes().all(|b| b.is_ascii_alphanumeric()),
            "passwords must be at least 16 letters and digits (`openssl rand -hex 24`)"
        );
    }
    print!(
        "{}",
        dsvl_cache::acl::users_acl(
            &args.gateway_password,
            &args.vision_password,
            &args.decoder_password
        )
    );
    Ok(())
}
