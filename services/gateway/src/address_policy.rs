//! Which network addresses an image-URL fetch may reach.
//!
//! An allow-listed host name is not enough: its DNS answer can point anywhere, including the
//! cluster's own Redis, the cloud metadata service or the node's loopback. So every address a
//! name resolves to is classified here, and the fetch connects to a vetted address itself (no
//! second resolution that a rebinding DNS server could answer differently). Addresses that
//! embed an IPv4 address (IPv4-mapped, IPv4-compatible, well-known NAT64, 6to4) are judged by
//! it; local-use NAT64, SIIT and Teredo addresses, whose IPv4 part cannot be judged, are
//! internal. Cloud metadata endpoints are link-local (covered) except Azure's, listed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Whether `ip` is internal: loopback, private, link-local, carrier-grade NAT, unspecified,
/// multicast, broadcast, reserved, documentation or benchmarking ranges, or an IPv6 address
/// that embeds one of those.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => v4_internal(a),
        IpAddr::V6(a) => v6_internal(a),
    }
}

fn v4_internal(a: Ipv4Addr) -> bool {
    let [o0, o1, o2, _] = a.octets();
    a.is_private()
        || a.is_loopback()
        || a.is_link_local()
        || a.is_unspecified()
        || a.is_broadcast()
        || a.is_multicast()
        || a.is_documentation()
        || o0 == 0 // "this network"
        || (o0 == 100 && (o1 & 0xc0) == 64) // 100.64.0.0/10, carrier-grade NAT
        || (o0 == 192 && o1 == 0 && o2 == 0) // 192.0.0.0/24, IETF protocol assignments
        || (o0 == 198 && (o1 & 0xfe) == 18) // 198.18.0.0/15, benchmarking
        || o0 >= 240 // reserved
        || a == Ipv4Addr::new(168, 63, 129, 16) // Azure's platform endpoint (public range)
}

fn v6_internal(a: Ipv6Addr) -> bool {
    if let Some(v4) = a.to_ipv4_mapped() {
        return v4_internal(v4);
    }
    let s = a.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    a.is_loopback()
        || a.is_unspecified()
        || a.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // fc00::/7, unique local
        || (s[0] & 0xffc0) == 0xfe80 // fe80::/10, link-local
        || (s[0] & 0xffc0) == 0xfec0 // fec0::/10, deprecated site-local
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0..6] == [0; 6] && v4_internal(embedded(s[6], s[7]))) // IPv4-compatible
        || (s[0..6] == [0x64, 0xff9b, 0, 0, 0, 0] && v4_internal(embedded(s[6], s[7]))) // NAT64
        || (s[0..3] == [0x64, 0xff9b, 1]) // 64:ff9b:1::/48, local-use NAT64: any IPv4 behind it
        || (s[0..6] == [0, 0, 0, 0, 0xffff, 0]) // ::ffff:0:0:0/96, SIIT-translated IPv4
        || (s[0] == 0x2001 && s[1] == 0) // 2001::/32, Teredo (the IPv4 inside is obfuscated)
        || (s[0] == 0x2002 && v4_internal(embedded(s[1], s[2]))) // 6to4
}

/// A URL host as compared with the allow-list and resolved: lower case, without the brackets
/// of an IPv6 literal and without one trailing dot (`Example.COM.` is `example.com`).
///
/// # Errors
/// An empty host, a zone id (`%`), or characters no host name has.
pub fn normalize_host(host: &str) -> Result<String, String> {
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if host.is_empty() {
        return Err("the URL has no host".into());
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok(host);
    }
    let valid = host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !valid || host.len() > 253 {
        return Err(format!("`{host}` is not a valid host name"));
    }
    Ok(host)
}

/// Whether the normalised `host` matches an allow-list entry: `example.com` matches exactly
/// that host; `*.example.com` matches its subdomains (not `example.com` itself).
pub fn host_allowed(host: &str, allow: &[String]) -> bool {
    allow.iter().any(|entry| {
        let (wildcard, name) = match entry.strip_prefix("*.") {
            Some(name) => (true, name),
            None => (false, entry.as_str()),
        };
        let Ok(name) = normalize_host(name) else { return false };
        if wildcard {
            host.strip_suffix(&name).is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
        } else {
            host == name
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn internal(s: &str) -> bool {
        is_internal(s.parse().unwrap())
    }

    #[test]
    fn internal_ranges_are_recognised_in_every_spelling() {
        for ip in [
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "240.0.0.1",
            "192.0.0.8",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "2001:db8::1",
            "64:ff9b:1::a00:1",
            "::ffff:0:7f00:1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "168.63.129.16",
        ] {
            assert!(internal(ip), "{ip} should be internal");
        }
        for ip in
            ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8"]
        {
            assert!(!internal(ip), "{ip} should be public");
        }
    }

    #[test]
    fn hosts_are_normalised_before_matching() {
        assert_eq!(normalize_host("Images.Example.COM.").unwrap(), "images.example.com");
        assert_eq!(normalize_host("[::1]").unwrap(), "::1");
        assert!(normalize_host("").is_err());
        assert!(normalize_host("[fe80::1%25eth0]").is_err());
        assert!(normalize_host("a..b").is_err());
        assert!(normalize_host("evil.com\\@good.com").is_err());
    }

    #[test]
    fn allow_list_matches_exact_hosts_and_explicit_wildcards() {
        let allow = vec!["images.example.com".to_string(), "*.cdn.example".to_string()];
        assert!(host_allowed("images.example.com", &allow));
        assert!(host_allowed("a.cdn.example", &allow));
        assert!(!host_allowed("cdn.example", &allow));
        assert!(!host_allowed("evilcdn.example", &allow));
        assert!(!host_allowed("images.example.com.evil.com", &allow));
        assert!(!host_allowed("example.com", &allow));
        assert!(!host_allowed("evil.com", &allow));
        let trailing = vec!["Images.Example.com.".to_string()];
        assert!(host_allowed(&normalize_host("images.example.com.").unwrap(), &trailing));
    }
}
