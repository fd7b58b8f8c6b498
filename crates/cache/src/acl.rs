//! Least-privilege Redis users, one per tier.
//!
//! One all-powerful credential shared by every tier would let the internet-facing gateway (or
//! anyone who takes it over) overwrite embeddings the decoders read. Each tier gets its own ACL
//! user instead, allowed only the commands and key patterns it uses:
//!
//! | user | may |
//! |---|---|
//! | `dsvl-gateway` | check that embeddings exist (never read or write them); read and update the shared quota buckets through their Lua scripts |
//! | `dsvl-vision` | read and write embeddings; take and release the encode leases |
//! | `dsvl-decoder` | read embeddings |
//!
//! Redis 7 checks the commands a Lua script runs against the calling user, so the gateway's
//! `EVAL` cannot reach an embedding either. [`users_acl`] writes an ACL file (`aclfile`) with
//! these users and the default user off; `deploy/README.md` shows how to make the Secret from
//! it. The rules are tested against a real `redis-server` (`tests/acl.rs`).

use dsvl_core::cache_key::{KEY_PREFIX, LEASE_PREFIX};

/// The prefix of the gateway's shared quota buckets.
pub const QUOTA_PREFIX: &str = "dsvl:quota:";

/// A tier's Redis user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierUser {
    /// The gateway.
    Gateway,
    /// The vision-encoder.
    Vision,
    /// The decoder.
    Decoder,
}

impl TierUser {
    /// Every tier.
    pub const ALL: [Self; 3] = [Self::Gateway, Self::Vision, Self::Decoder];

    /// The user name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gateway => "dsvl-gateway",
            Self::Vision => "dsvl-vision",
            Self::Decoder => "dsvl-decoder",
        }
    }

    /// The user's permissions, in `ACL SETUSER` syntax (without `on` and the password).
    pub fn rules(self) -> String {
        // PING and what a Redis Cluster client needs to learn the slot map and read from
        // replicas, besides the tier's own commands (redis-rs's `CLIENT SETINFO` on connect may
        // be refused: it ignores the answer, as older servers lack the command).
        let common =
            "resetkeys resetchannels -@all +ping +cluster|slots +cluster|shards +readonly +asking";
        let tier = match self {
            Self::Gateway => format!(
                "%R~{KEY_PREFIX}* ~{QUOTA_PREFIX}* +exists +eval +evalsha +time +hmget +hset +pexpire"
            ),
            Self::Vision => format!(
                "~{KEY_PREFIX}* ~{LEASE_PREFIX}* +get +mget +exists +set +del +eval +evalsha"
            ),
            Self::Decoder => format!("%R~{KEY_PREFIX}* +get +mget +exists"),
        };
        format!("{common} {tier}")
    }

    /// The `users.acl` line of this user with `password`.
    pub fn acl_line(self, password: &str) -> String {
        format!("user {} on >{password} {}", self.name(), self.rules())
    }
}

/// An ACL file: the default user off, one user per tier with its password.
pub fn users_acl(gateway: &str, vision: &str, decoder: &str) -> String {
    let mut out = String::from("user default off\n");
    for (tier, password) in
        [(TierUser::Gateway, gateway), (TierUser::Vision, vision), (TierUser::Decoder, decoder)]
    {
        out.push_str(&tier.acl_line(password));
        out.push('\n');
    }
    out
}
