//! Every metric of every tier, in one table: name, type, labels, the tiers that export it,
//! what it measures, and for the decoder's request series the vLLM metric it mirrors.
//!
//! The table is the single source: [`describe`] registers each metric's help text when a tier
//! installs its Prometheus endpoint (so the exposition passes `promtool check metrics`), and
//! `services/METRICS.md` is generated from it ([`reference_page`]). Tests keep it honest: the
//! page must equal the table, every `metrics::counter!/gauge!/histogram!` name in the
//! workspace's source must be in the table with its type, and every entry must be recorded
//! somewhere in the source.
//!
//! **vLLM's names.** vLLM exports `vllm:<name>`; Prometheus' own linter refuses colons in
//! exported names (they are reserved for recording rules), so dsvl exports `vllm_<name>` and
//! the Kubernetes scrape config (`deploy/prometheus/vllm-names.yml`)
//! renames `vllm_(.*)` to `vllm:$1` at ingestion: dashboards built for vLLM read the stored
//! series unchanged. Every series of the decoder and the gateway carries `model_name` (a global
//! label of those processes).

/// A metric's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic count.
    Counter,
    /// Value that goes up and down.
    Gauge,
    /// Distribution (buckets, sum, count).
    Histogram,
}

/// A process that exports metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// `dsvl-gateway`.
    Gateway,
    /// `dsvl-vision-encoder`.
    Vision,
    /// `dsvl-decoder` (rank 0).
    Decoder,
}

/// One metric.
#[derive(Debug)]
pub struct Metric {
    /// Exported name.
    pub name: &'static str,
    /// Type.
    pub kind: Kind,
    /// Labels besides the process-wide `model_name`.
    pub labels: &'static [&'static str],
    /// Who exports it.
    pub tiers: &'static [Tier],
    /// What it measures (the `# HELP` text).
    pub help: &'static str,
}

use Kind::{Counter, Gauge, Histogram};
use Tier::{Decoder, Gateway, Vision};

macro_rules! m {
    ($name:literal, $kind:ident, [$($l:literal),*], [$($t:ident),*], $help:literal) => {
        Metric { name: $name, kind: $kind, labels: &[$($l),*], tiers: &[$($t),*], help: $help }
    };
}

/// Buckets of the token-count histograms (`vllm_request_*_tokens`).
pub const TOKEN_BUCKETS: &[f64] =
    &[1.0, 8.0, 32.0, 128.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0];
/// Buckets of `dsvl_vision_batch_size`.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// Every metric, by tier.
pub const METRICS: &[Metric] = &[
    // Gateway.
    m!("dsvl_requests_total", Counter, ["api", "outcome"], [Gateway], "Finished chat requests by API (grpc, http) and outcome (ok or the error kind)."),
    m!("dsvl_e2e_latency_seconds", Histogram, ["api"], [Gateway], "Whole request at the gateway, from arrival to the last byte."),
    m!("dsvl_time_to_first_token_seconds", Histogram, ["api"], [Gateway], "From arrival at the gateway to the first token."),
    m!("dsvl_inter_token_latency_seconds", Histogram, ["api"], [Gateway], "Gap between consecutive tokens of a reply, at the gateway."),
    m!("dsvl_gateway_requests_in_flight", Gauge, [], [Gateway], "Requests admitted and not yet finished (the autoscaling signal)."),
    m!("dsvl_gateway_quota_fallbacks_total", Counter, [], [Gateway], "Quota checks made against this replica's own buckets because the shared ones in Redis could not be asked."),
    m!("dsvl_gateway_routing_seconds", Histogram, ["tier"], [Gateway], "Time to choose an upstream replica."),
    m!("dsvl_upstream_latency_seconds", Histogram, ["tier"], [Gateway], "Upstream call latency (vision: whole call; decoder: to the first token)."),
    m!("dsvl_gateway_retries_total", Counter, ["tier"], [Gateway], "Upstream calls retried on another replica."),
    m!("dsvl_gateway_retries_denied_total", Counter, [], [Gateway], "Retries refused by the retry budget."),
    m!("dsvl_gateway_reencodes_total", Counter, [], [Gateway], "Requests whose image embeddings were re-sent inline because the decoder could not read the cached ones."),
    m!("dsvl_gateway_healthy_upstreams", Gauge, ["tier"], [Gateway], "Upstream replicas currently usable."),
    m!("dsvl_gateway_prefix_routes_total", Counter, ["choice"], [Gateway], "Decoder routing decisions: prefix (longest cached prefix), miss (no group holds one), imbalanced (too busy; least work instead)."),
    // Vision encoder.
    m!("dsvl_vision_queue_depth", Gauge, [], [Vision], "Images waiting for the encoder."),
    m!("dsvl_vision_model_busy", Gauge, [], [Vision], "1 while the encoder runs a batch."),
    m!("dsvl_vision_batch_size", Histogram, [], [Vision], "Images per encoder batch."),
    m!("dsvl_vision_encode_duration_seconds", Histogram, [], [Vision], "Encoder time per batch."),
    m!("dsvl_vision_request_duration_seconds", Histogram, [], [Vision], "Whole Encode call."),
    m!("dsvl_vision_images_encoded_total", Counter, [], [Vision], "Images run through the encoder."),
    m!("dsvl_vision_images_per_second", Gauge, [], [Vision], "Recent encoder throughput."),
    m!("dsvl_vision_jobs_dropped_total", Counter, ["reason"], [Vision], "Queued images dropped before encoding (their callers left)."),
    m!("dsvl_vision_cache_requests_total", Counter, ["tier", "outcome"], [Vision], "Embedding cache lookups by cache tier (local, shared) and outcome (hit, miss, error)."),
    m!("dsvl_vision_single_flight_waits_total", Counter, [], [Vision], "Requests that waited for the same image being encoded in this process."),
    m!("dsvl_vision_lease_waits_total", Counter, [], [Vision], "Requests that waited for another replica's encode lease on the same image."),
    // Shared cache client.
    m!("dsvl_cache_errors_total", Counter, ["op", "kind"], [Gateway, Vision, Decoder], "Shared-cache (Redis) calls that failed, by operation (`get`, `put`, `exists`, `eval`, `lease`, `release`) and kind (`timeout`, `connection`, `redis`, `breaker_open` for calls refused while the circuit breaker is open, `config`)."),
    m!("dsvl_tls_handshake_failures_total", Counter, [], [Gateway, Vision, Decoder], "TLS handshakes that failed or timed out on this process's listeners (no client certificate, an unknown authority, plain text)."),
    m!("dsvl_tls_reloads_total", Counter, ["outcome"], [Gateway, Vision, Decoder], "Certificate and key files re-read after they changed (`ok`, or `error` when the new files could not be used and the previous ones stay)."),
    m!("dsvl_cache_breaker_state", Gauge, [], [Gateway, Vision, Decoder], "Redis circuit breaker: 0 closed, 1 half-open (one probe call in flight), 2 open."),
    // Decoder.
    m!("dsvl_decoder_waiting", Gauge, [], [Decoder], "Requests waiting for admission."),
    m!("dsvl_decoder_running", Gauge, [], [Decoder], "Sequences in the running batch."),
    m!("dsvl_decoder_kv_blocks_used", Gauge, [], [Decoder], "KV cache blocks held by sequences."),
    m!("dsvl_decoder_kv_blocks", Gauge, [], [Decoder], "KV cache blocks per rank."),
    m!("dsvl_decoder_kv_cache_tokens", Gauge, [], [Decoder], "KV cache capacity in tokens per rank."),
    m!("dsvl_decoder_kv_usage_ratio", Gauge, [], [Decoder], "Held KV blocks / all KV blocks."),
    m!("dsvl_decoder_prefix_cache_blocks", Gauge, [], [Decoder], "Released KV blocks kept for prefix reuse (evictable)."),
    m!("dsvl_decoder_prefix_cache_evictions_total", Counter, [], [Decoder], "Cached KV blocks evicted for new ones."),
    m!("dsvl_decoder_prefix_cache_queries_total", Counter, [], [Decoder], "Prompt tokens looked up in the prefix cache."),
    m!("dsvl_decoder_prefix_cache_hits_total", Counter, [], [Decoder], "Prompt tokens found in the prefix cache."),
    m!("dsvl_decoder_tokens_per_second", Gauge, [], [Decoder], "Recent generated tokens per second."),
    m!("dsvl_decoder_requests_total", Counter, ["outcome"], [Decoder], "Finished sequences by outcome (ok, cancelled, deadline, grammar_error, ...)."),
    m!("dsvl_decoder_preemptions_total", Counter, [], [Decoder], "Sequences preempted (recomputed later) for lack of KV blocks."),
    m!("dsvl_decoder_generated_tokens_total", Counter, [], [Decoder], "Generated tokens."),
    m!("dsvl_decoder_queue_seconds", Histogram, [], [Decoder], "From arrival to admission into the batch."),
    m!("dsvl_decoder_time_to_first_token_seconds", Histogram, [], [Decoder], "From arrival at the decoder to the first token."),
    m!("dsvl_decoder_inter_token_latency_seconds", Histogram, [], [Decoder], "Gap between consecutive tokens of a sequence."),
    m!("dsvl_decoder_embedding_errors_total", Counter, ["reason"], [Decoder], "Image embeddings refused (corrupt, another model's fingerprint)."),
    // Decoder, in vLLM's names (vllm:<name> after the scrape-time rename).
    m!("vllm_prompt_tokens_total", Counter, [], [Decoder], "vLLM's prompt_tokens_total: prompt tokens of admitted requests (cached ones included)."),
    m!("vllm_generation_tokens_total", Counter, [], [Decoder], "vLLM's generation_tokens_total: generated tokens."),
    m!("vllm_request_prompt_tokens", Histogram, [], [Decoder], "vLLM's request_prompt_tokens: prompt length of finished requests."),
    m!("vllm_request_generation_tokens", Histogram, [], [Decoder], "vLLM's request_generation_tokens: generated tokens of finished requests."),
    m!("vllm_e2e_request_latency_seconds", Histogram, [], [Decoder], "vLLM's e2e_request_latency_seconds: arrival to finish at the decoder."),
    m!("vllm_request_queue_time_seconds", Histogram, [], [Decoder], "vLLM's request_queue_time_seconds: arrival to admission."),
    m!("vllm_request_prefill_time_seconds", Histogram, [], [Decoder], "vLLM's request_prefill_time_seconds: admission to the first token."),
    m!("vllm_request_decode_time_seconds", Histogram, [], [Decoder], "vLLM's request_decode_time_seconds: first token to finish."),
    m!("vllm_time_to_first_token_seconds", Histogram, [], [Decoder], "vLLM's time_to_first_token_seconds: arrival to the first token."),
    m!("vllm_inter_token_latency_seconds", Histogram, [], [Decoder], "vLLM's inter_token_latency_seconds: gap between consecutive tokens."),
    m!("vllm_num_requests_running", Gauge, [], [Decoder], "vLLM's num_requests_running: sequences in the batch."),
    m!("vllm_num_requests_waiting", Gauge, [], [Decoder], "vLLM's num_requests_waiting: requests waiting for admission."),
    m!("vllm_kv_cache_usage_perc", Gauge, [], [Decoder], "vLLM's kv_cache_usage_perc: held KV blocks / all KV blocks (a fraction, 1 = full)."),
    m!("vllm_num_preemptions_total", Counter, [], [Decoder], "vLLM's num_preemptions_total: preemptions."),
    m!("vllm_request_success_total", Counter, ["finished_reason"], [Decoder], "vLLM's request_success_total: finished requests by reason (stop, length, abort)."),
    m!("vllm_prefix_cache_queries_total", Counter, [], [Decoder], "vLLM's prefix_cache_queries: prompt tokens looked up in the prefix cache."),
    m!("vllm_prefix_cache_hits_total", Counter, [], [Decoder], "vLLM's prefix_cache_hits: prompt tokens found in the prefix cache."),
];

/// Registers the help text of every metric `tier` exports with the installed recorder.
pub fn describe(tier: Tier) {
    for m in METRICS.iter().filter(|m| m.tiers.contains(&tier)) {
        match m.kind {
            Counter => metrics::describe_counter!(m.name, m.help),
            Gauge => metrics::describe_gauge!(m.name, m.help),
            Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

/// The reference page (`services/METRICS.md`), in Markdown.
pub fn reference_page() -> String {
    let mut out = String::from(
        "# Metrics\n\nGenerated from `crates/telemetry/src/catalog.rs` (a test keeps this file \
         equal to it, and the table equal to the metrics the source records). Every tier serves \
         Prometheus text on `--metrics-listen` (`/metrics`); the decoder's and the gateway's \
         series all carry `model_name`. The `vllm_*` series mirror vLLM's metrics of the same \
         names; the bundled scrape config renames them to vLLM's `vllm:*` at ingestion (Prometheus' \
         linter refuses colons in exported names).\n",
    );
    for (tier, title) in
        [(Tier::Gateway, "Gateway"), (Tier::Vision, "Vision encoder"), (Tier::Decoder, "Decoder")]
    {
        out.push_str(&format!(
            "\n## {title}\n\n| metric | type | labels | meaning |\n|---|---|---|---|\n"
        ));
        for m in METRICS.iter().filter(|m| m.tiers.contains(&tier)) {
            let kind = match m.kind {
                Counter => "counter",
                Gauge => "gauge",
                Histogram => "histogram",
            };
            let labels = m.labels.iter().map(|l| format!("`{l}`")).collect::<Vec<_>>().join(", ");
            out.push_str(&format!("| `{}` | {kind} | {labels} | {} |\n", m.name, m.help));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;

    fn repo() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
    }

    #[test]
    fn the_reference_page_is_current() {
        let path = repo().join("services/METRICS.md");
        let page = reference_page();
        if std::env::var_os("DSVL_WRITE_REFERENCE").is_some() {
            std::fs::write(&path, &page).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == page,
            "services/METRICS.md is stale: run `DSVL_WRITE_REFERENCE=1 cargo test -p dsvl-telemetry catalog`"
        );
    }

    /// Every `metrics::<kind>!("name"` in the product's source (crates/ and services/, tests
    /// excluded), with its kind.
    fn recorded() -> BTreeMap<String, Kind> {
        let mut out = BTreeMap::new();
        let mut dirs = vec![repo().join("crates"), repo().join("services")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = entry.path();
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                if p.is_dir() {
                    if name != "tests" && name != "target" {
                        dirs.push(p);
                    }
                    continue;
                }
                if !name.ends_with(".rs") || p.ends_with("catalog.rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&p).unwrap();
                for (kind, word) in
                    [(Counter, "counter"), (Gauge, "gauge"), (Histogram, "histogram")]
                {
                    let needle = format!("metrics::{word}!(");
                    for (at, _) in text.match_indices(&needle) {
                        let rest = text[at + needle.len()..].trim_start();
                        let Some(rest) = rest.strip_prefix('"') else { continue };
                        let metric = &rest[..rest.find('"').unwrap()];
                        let prev = out.insert(metric.to_string(), kind);
                        assert!(prev.is_none_or(|k| k == kind), "{metric}: two kinds");
                    }
                }
            }
        }
        out
    }

    #[test]
    fn the_table_is_what_the_source_records() {
        let recorded = recorded();
        assert!(recorded.len() > 40, "the scan found the metrics: {recorded:?}");
        for (name, kind) in &recorded {
            let m = METRICS.iter().find(|m| m.name == name);
            let m = m.unwrap_or_else(|| panic!("`{name}` is recorded but not in the catalog"));
            assert_eq!(m.kind, *kind, "{name}");
        }
        for m in METRICS {
            assert!(
                recorded.contains_key(m.name),
                "`{}` is in the catalog but never recorded",
                m.name
            );
            assert!(!m.tiers.is_empty() && !m.help.is_empty(), "{}", m.name);
            // promtool's lint: counters end in _total, nothing else does.
            assert_eq!(m.kind == Counter, m.name.ends_with("_total"), "{}", m.name);
        }
        let mut names: Vec<_> = METRICS.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), METRICS.len(), "a metric is listed twice");
    }
}
